"""Run a module of ``liteattn.demo`` without importing liteattn's top-level package.

    python bench/run_demo_module.py liteattn.demo.train --model large --out .ckpt/large

The demo's data, model, sampling and training need nothing from liteattn's attention code; importing only
``liteattn.demo`` keeps device runs of the demo model independent of that code (and of work in progress on it).
"""

import pathlib
import runpy
import sys
import types

root = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root))
package = types.ModuleType("liteattn")
package.__path__ = [str(root / "liteattn")]
sys.modules.setdefault("liteattn", package)

if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].startswith("liteattn.demo."):
        raise SystemExit("usage: python bench/run_demo_module.py liteattn.demo.MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
