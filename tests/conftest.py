"""Test-wide settings: the Triton kernel runs in the interpreter without a GPU, with one pinned config."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before liteattn.backends.triton_kernel is imported (triton.jit reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LITEATTN_PIN_CONFIG", "1")
