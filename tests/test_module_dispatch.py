"""How a ``LiteAttention`` call is dispatched: the eager path's imports (issue 15, item 6), the custom op under
autograd and dispatch modes, and dense calls taking PyTorch's attention (issue 11)."""

import math

import pytest
import torch

from liteattn import LiteAttention
from liteattn.testing import structured_qkv


def test_eager_calls_do_not_import_dynamo():
    """A plain eager call skips the custom op's dispatcher, whose kernel guard imports torch._dynamo (and sympy,
    triton, ...: ~1.5 s) on the op's first call in a process. The module set is asserted, not the time."""
    import subprocess
    import sys

    code = ("import sys, torch, liteattn\n"
            "q = torch.randn(1, 100, 2, 16)\n"
            "attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32)\n"
            "for _ in range(2): out, lse = attn(q, q, q, return_softmax_lse=True, must_do_list=[(0, 10)])\n"
            "sp = liteattn.SeqParallelLiteAttention(2, tile_q=32, tile_k=32)\n"
            "sp(q, q[:, :50], q[:, :50], 0, must_do_q_list=[(0, 16)])\n"
            "liteattn.lite_attention(q, q, q, tile_q=32, tile_k=32)\n"
            "heavy = ('torch._dynamo', 'torch._inductor', 'sympy')\n"
            "print(sorted(p for p in heavy if any(m == p or m.startswith(p + '.') for m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_custom_op_still_runs_when_something_watches_the_call():
    """Autograd (backward raises), dispatch modes (the op is one node) and the direct path agree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    q, k, v = structured_qkv(1, 100, 2, 16, seed=2)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    direct, watched = (LiteAttention(threshold=-2.0, tile_q=32, tile_k=32, backend="torch") for _ in range(2))
    for step in range(3):
        out = direct(q, k, v)
        with Ops() as ops:
            ref = watched(q, k, v)
        assert "liteattn.attention_fwd.default" in ops.seen
        assert torch.equal(out, ref)
        assert torch.equal(direct.skip_state.read.to_dense(), watched.skip_state.read.to_dense())
    assert direct.sparsity > 0
    qg = q.clone().requires_grad_()
    out = LiteAttention(tile_q=32, tile_k=32, backend="torch")(qg, k, v)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_dense_calls_take_pytorchs_attention(monkeypatch):
    """Issue 11: a call that reads every tile and decides nothing (skipping off, or -inf on an untouched state) is
    plain attention, and runs PyTorch's scaled_dot_product_attention (cuDNN / FlashAttention on a GPU)."""
    from liteattn import backends

    chosen = []
    real_choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda *a, **kw: chosen.append(real_choose(*a, **kw)) or chosen[-1])
    q, k, v = structured_qkv(1, 200, 2, 16, seed=3, sharpness=(1.0, 3.0))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)
    off = LiteAttention(enable_skipping=False, tile_q=32, tile_k=32)
    assert torch.equal(off(q, k, v), sdpa) and chosen[-1] == "sdpa"
    attn = LiteAttention(threshold=-math.inf, tile_q=32, tile_k=32)
    for _ in range(2):
        assert torch.equal(attn(q, k, v), sdpa) and chosen[-1] == "sdpa"
        assert attn.skip_state.untouched and attn.sparsity == 0.0
    attn(q, k, v, return_softmax_lse=True)  # an LSE is asked for: the core's dense path
    assert chosen[-1] == "torch"
    attn.set_threshold(-2.0)
    attn(q, k, v)
    assert chosen[-1] == "torch" and not attn.skip_state.untouched and attn.skip_state.sparsity() > 0
    attn.set_threshold(-math.inf)  # tiles were dropped: the state path, on the narrowed list
    attn(q, k, v)
    assert chosen[-1] == "torch" and attn.sparsity > 0
    attn.reset_skip_state()
    attn(q, k, v)
    assert chosen[-1] == "sdpa"
