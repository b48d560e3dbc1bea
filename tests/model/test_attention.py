"""Attention semantics: kernels agree, GQA generalises MHA, windows and RoPE behave."""

import pytest
import torch

from llmkit.model.attention import CausalSelfAttention
from llmkit.model.kernels import KERNELS
from llmkit.model.positions import POSITIONS, PositionContext
from tests.model.helpers import VOCAB, tiny_model

POSITION_NAMES = ["none", "learned", "sinusoidal", "rope", "alibi", "t5"]
# fp32 throughout. sdpa and flex sum in a different order than the eager reference (fused
# online softmax), so results differ by rounding: ~1e-6 relative for these sizes; 1e-5 is tight
# enough that a wrong mask, bias or head grouping (errors of order 1e-1) cannot pass.
TOL = dict(rtol=1e-5, atol=1e-5)


def _logits(kernel: str, position: str, **attention: object) -> torch.Tensor:
    model = tiny_model(position={"name": position}, attention={"name": "causal", "kernel": kernel, **attention})
    idx = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("position", POSITION_NAMES)
@pytest.mark.parametrize(
    "attention", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1}, {"window": 6}, {"n_kv_heads": 2, "window": 6}],
    ids=["mha", "gqa", "mqa", "window", "gqa_window"],
)
def test_kernel_matches_eager_reference(kernel: str, position: str, attention: dict) -> None:
    torch.testing.assert_close(_logits(kernel, position, **attention), _logits("eager", position, **attention), **TOL)


def test_sdpa_backward_matches_eager() -> None:
    grads = {}
    for kernel in ("eager", "sdpa"):
        attention = {"name": "causal", "kernel": kernel, "n_kv_heads": 2, "window": 7}
        model = tiny_model(position={"name": "alibi"}, attention=attention)
        idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
        model.loss(idx[:, :-1], idx[:, 1:]).loss.backward()
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["sdpa"], grads["eager"], **TOL)


def test_unknown_kernel_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="eager, flex, sdpa, xformers"):
        tiny_model(attention={"name": "causal", "kernel": "sdpaa"})


def test_flex_refuses_cpu_backward_with_clear_error() -> None:
    model = tiny_model(attention={"name": "causal", "kernel": "flex"}).train()
    idx = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(NotImplementedError, match="kernel=sdpa"):
        model.loss(idx[:, :-1], idx[:, 1:])


def test_xformers_gives_clear_error_off_cuda() -> None:
    model = tiny_model(attention={"name": "causal", "kernel": "xformers"})
    with pytest.raises((ImportError, RuntimeError), match="kernel=sdpa"):
        model(torch.randint(0, VOCAB, (1, 8)))


def _attention(n_kv_heads: int | None, window: int | None = None) -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, window=window, kernel="eager").eval()


def _ctx(T: int) -> PositionContext:
    pos = torch.arange(T)
    return PositionContext(pos, pos)


def test_gqa_with_as_many_kv_heads_as_query_heads_is_mha() -> None:
    mha, gqa = _attention(None), _attention(4)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(gqa(x, _ctx(10)), mha(x, _ctx(10)), rtol=0, atol=0)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa, mha = _attention(2), _attention(None)
    with torch.no_grad():  # MHA whose 4 kv heads copy GQA's 2, each used by 2 query heads
        d = 8
        wq, wk, wv = gqa.wqkv.weight.split([32, 16, 16])
        repeat = lambda w: w.view(2, d, 32).repeat_interleave(2, dim=0).reshape(32, 32)
        mha.wqkv.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.wo.weight.copy_(gqa.wo.weight)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(gqa(x, _ctx(10)), mha(x, _ctx(10)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_window_at_least_sequence_length_is_full_causal(kernel: str) -> None:
    full, windowed = _attention(None), _attention(None, window=10)
    full.kernel = windowed.kernel = KERNELS.get(kernel)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(windowed(x, _ctx(10)), full(x, _ctx(10)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_token_outside_window_has_no_effect(kernel: str) -> None:
    attn = _attention(None, window=4)
    attn.kernel = KERNELS.get(kernel)
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, 3] += 1.0  # position 3 is outside the window of positions 7.. (they see 4 tokens back to t-3)
    out_x, out_y = attn(x, _ctx(12)), attn(y, _ctx(12))
    torch.testing.assert_close(out_x[:, 7:], out_y[:, 7:], rtol=0, atol=1e-6)
    assert (out_x[:, 3:7] - out_y[:, 3:7]).abs().amax(dim=-1).min() > 1e-4  # inside: it matters


def test_rope_scores_depend_only_on_relative_offset() -> None:
    rope = POSITIONS.build("rope", head_dim=16, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(q_at: int, k_at: int) -> torch.Tensor:
        ctx = rope.context(torch.tensor([q_at]), torch.tensor([k_at]))
        return (ctx.rotate_q(q) * ctx.rotate_k(k)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(7, 7), score(40, 40), rtol=1e-5, atol=1e-5)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3  # but it does depend on the offset


def test_alibi_penalises_distance_linearly() -> None:
    alibi = POSITIONS.build("alibi", n_heads=4)
    pos = torch.arange(6)
    bias = alibi.context(pos, pos).bias  # (H, T, S)
    slopes = alibi.slopes
    assert torch.allclose(bias[:, 5, 2], -3 * slopes)
    assert torch.allclose(bias[:, 4, 4], torch.zeros(4))


def test_t5_buckets_are_exact_near_and_logarithmic_far() -> None:
    t5 = POSITIONS.build("t5", n_heads=2, num_buckets=32, max_distance=128)
    distance = torch.tensor([0, 1, 15, 16, 127, 500])
    buckets = t5.bucket(distance)
    assert buckets[:3].tolist() == [0, 1, 15]
    assert 16 <= buckets[3] < buckets[4] <= 31 and buckets[5] == 31


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_one_mask_per_forward_is_shared_by_the_layers(kernel: str, monkeypatch) -> None:
    # the layers of one forward share its PositionContext and read the mask the first one built (a decoding
    # step's mask cost more than its attention); a copy of the context (other positions) starts without it
    import dataclasses

    import llmkit.model.kernels as kernels

    built = []
    original = kernels.additive_mask
    monkeypatch.setattr(kernels, "additive_mask", lambda *a: built.append(1) or original(*a))
    model = tiny_model(position={"name": "alibi"}, attention={"name": "causal", "kernel": kernel})
    assert len(model.blocks) > 1
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        model(ids)
    assert len(built) == 1
    ctx = model.position.context(torch.arange(3), torch.arange(3))
    ctx.masks["x"] = torch.zeros(())
    assert dataclasses.replace(ctx, q_pos=torch.arange(1)).masks == {}
