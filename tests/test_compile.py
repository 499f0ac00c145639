"""torch.compile through liteattn: one custom op, no graph breaks, thresholds that change between calls."""

import torch

import liteattn
from liteattn.ops import tile_mask
from liteattn.testing import structured_qkv

MUST_DO = [(0, 40), (150, 161)]


def test_compiled_layer_matches_eager_with_must_do_and_changing_threshold():
    q, k, v = structured_qkv(1, 200, 2, 32)
    compiled_attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32, backend="torch")
    eager_attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32, backend="torch")

    def step(attn, q, k, v):
        return attn(q, k, v, must_do_list=MUST_DO) * 2

    compiled = torch.compile(step, backend="inductor")
    for threshold in (-6.0, -5.0, -3.0, 0.0):
        compiled_attn.set_threshold(threshold)
        eager_attn.set_threshold(threshold)
        out = compiled(compiled_attn, q, k, v)
        ref = step(eager_attn, q, k, v)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert torch.equal(compiled_attn.skip_state.read.to_dense(), eager_attn.skip_state.read.to_dense())
    assert eager_attn.sparsity > 0
    torch._dynamo.reset()


def test_no_graph_break_in_the_attention_call():
    q, k, v = structured_qkv(1, 200, 2, 32)
    attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32, backend="torch")
    explanation = torch._dynamo.explain(lambda q, k, v: attn(q, k, v, must_do_list=MUST_DO))(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_compiled_must_do_mask_equals_the_cached_one():
    ranges = ((0, 40), (150, 161))
    built = torch.compile(lambda: tile_mask(ranges, 200, 32, torch.device("cpu")), fullgraph=True)()
    assert torch.equal(built, tile_mask(ranges, 200, 32, torch.device("cpu")))
    assert built.tolist() == [True, True, False, False, True, True, False]
    torch._dynamo.reset()
