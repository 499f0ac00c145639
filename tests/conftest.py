"""Test-wide settings: the Triton kernel runs in the interpreter without a GPU, with one pinned config."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before liteattn.backends.triton_kernel is imported (triton.jit reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LITEATTN_PIN_CONFIG", "1")

try:  # the same examples on every run, so CI cannot fail by the draw (`--hypothesis-seed=N` explores others)
    from hypothesis import settings

    settings.register_profile("liteattn", derandomize=True)
    settings.load_profile("liteattn")
except ImportError:
    pass
