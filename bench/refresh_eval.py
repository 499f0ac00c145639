"""Re-admission (refresh=True) vs monotone lists on the small demo model (CPU, float32): calibrated mass rule, 1 prompt.

Usage: python bench/refresh_eval.py STEPS TARGETS   e.g. 10 0.03 (two calibration runs per target: ~6 min each on 2 cores)."""
import json, sys, time, torch, liteattn
from liteattn.demo import model as M, data
from liteattn.demo.sample import make_scheduler, sample
from liteattn.demo.metrics import psnr
torch.manual_seed(0)
m = M.load_model()
tokens = data.tokenize(["red circle moving right, blue square moving down"])
steps = int(sys.argv[1])
dense = sample(m, tokens, steps=steps)
rows = []
for target in [float(x) for x in sys.argv[2].split(",")]:
    for refresh in (False, True):
        sch = make_scheduler()
        h = liteattn.enable(m.transformer, target_error=target, refresh=refresh, criterion="mass", scheduler=sch)
        t = time.time(); v = sample(m, tokens, steps=steps, scheduler=sch); t = time.time() - t
        s = h.calibration_summary(); st = h.stats()
        row = dict(target=target, refresh=refresh, sparsity=st["mean_sparsity"], psnr=psnr(v, dense).mean().item(),
                   worst_error=max(s["error"]), refreshes=sum(s["refreshes"]), seconds=round(t, 1),
                   error_per_step=[round(e, 4) for e in s["error"]], sparsity_per_step=[round(x, 3) for x in st["sparsity"]])
        h.disable(); rows.append(row); print(json.dumps(row), flush=True)
json.dump(rows, open("refresh_eval.json", "w"), indent=1)
