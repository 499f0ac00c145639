"""The embedded demo: a small video diffusion model trained on procedural videos, shipped with liteattn.

``liteattn demo`` samples it with full attention and with liteattn and writes a GIF, plots and a report.

- :mod:`liteattn.demo.data`: procedural videos of moving, bouncing shapes with prompts (deterministic by seed).
- :mod:`liteattn.demo.model`: diffusers ``WanTransformer3DModel`` in pixel space (7M parameters) + prompt tokens;
  ``load_model()`` reads the shipped weights (``weights/tiny_wan.safetensors``), offline.
- :mod:`liteattn.demo.sample`: ``FlowMatchEulerDiscreteScheduler`` sampling with classifier-free guidance.
- :mod:`liteattn.demo.train`: the training script (flow matching, time-limited runs that resume).
- :mod:`liteattn.demo.run`: the demo command and :func:`~liteattn.demo.run.compare`, the quality measurement.
- :mod:`liteattn.demo.pictures`: the demo's GIF and skip-mask figure, at the model's clip shape.
"""

# Chosen from the quality table in bench/RESULTS.md ("Demo model quality").
DEFAULT_THRESHOLD = -6.0
# The demo's keep rule: the README's and RESULTS' demo figures were measured with the max rule at -6 (about the
# quality of the mass rule at -9, which skips 1.4x as much: bench/RESULTS.md, "Keep rules and calibration"), so the
# demo keeps it while liteattn.enable itself defaults to "mass".
DEFAULT_CRITERION = "max"
# Two prompts, 12 steps on the CPU: about 2 minutes on two idle cores (2 min 3 s, README). Before the CPU backend ran
# its blocks on single-threaded workers, `time liteattn demo --device cpu` took 21 min on two cores shared with other
# work (load 4-7; bench/RESULTS.md, "The CPU backend under load").
DEFAULT_STEPS = 12
DEFAULT_NUM_PROMPTS = 2
