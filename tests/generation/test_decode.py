"""Cached decoding gives the logits and tokens of full recomputation, for every position scheme x
attention option x block; the sliding-window cache stays within its window; batched prompts of
different lengths decode as each would alone."""

import itertools

import pytest
import torch

from llmkit.distributed import apply_compile
from llmkit.generation import CachedDecoder, RecomputeDecoder, SlidingWindowCache, generate
from tests.model.helpers import VOCAB, tiny_model

BLOCKS = ["pre_ln", "post_ln"]
POSITIONS = ["none", "learned", "sinusoidal", "rope", "alibi", "t5"]
WINDOW = 5  # smaller than the 7-token prompt and the 16 steps: the cache is trimmed many times
ATTENTION = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "sliding_window": {"window": WINDOW},
}
# fp32. The cache attends one query over S keys where recomputation attends T queries over T keys
# (sdpa's is_causal path): the same sums in another order, which differ by ~5e-7 here. 1e-5 is
# tight enough that a key at a wrong position, a missing key or a wrong bias (~1e-1) cannot pass.
TOL = dict(rtol=1e-5, atol=1e-5)
MAX_SEQ_LEN = 24  # tests/model/helpers.py


def _model(block: str = "pre_ln", position: str = "rope", attention: str = "gqa", **overrides: object):
    attn = {"name": "causal", **ATTENTION[attention], **overrides}
    return tiny_model(block={"name": block}, position={"name": position}, attention=attn)


def _prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("block,position,attention", list(itertools.product(BLOCKS, POSITIONS, ATTENTION)))
def test_cached_logits_and_greedy_tokens_equal_full_recomputation(block: str, position: str, attention: str) -> None:
    model = _model(block, position, attention)
    (prompt,) = _prompts(7)
    cached, full = CachedDecoder(model), RecomputeDecoder(model)
    logits_cached, logits_full = cached.prefill([prompt]), full.prefill([prompt])
    for step in range(16):  # 7 + 16 = 23 positions, within max_seq_len = 24
        torch.testing.assert_close(logits_cached, logits_full, **TOL, msg=lambda m, step=step: f"step {step}: {m}")
        token = logits_full.argmax(dim=-1).tolist()
        assert logits_cached.argmax(dim=-1).tolist() == token
        logits_cached, logits_full = cached.step(token), full.step(token)
    assert generate(model, [prompt], 16, temperature=0) == generate(model, [prompt], 16, temperature=0, cache=False)


@pytest.mark.parametrize("kernel", ["eager", "flex"])
@pytest.mark.parametrize("position", ["rope", "t5"])
@pytest.mark.parametrize("attention", ["gqa", "sliding_window"])
def test_every_kernel_decodes_from_the_cache(kernel: str, position: str, attention: str) -> None:
    model = _model(position=position, attention=attention, kernel=kernel)
    reference = _model(position=position, attention=attention)  # same weights, sdpa, no cache
    prompts = _prompts(3, 8)  # different lengths: per-row positions reach the kernel
    assert generate(model, prompts, 12, temperature=0) == generate(reference, prompts, 12, temperature=0, cache=False)


@pytest.mark.parametrize("position", POSITIONS)
def test_generation_past_max_seq_len_shifts_both_decoders_alike(position: str) -> None:
    model = _model(position=position, attention="sliding_window")
    prompts = _prompts(20, 6)  # row 0 fills its 24 positions after 4 tokens, row 1 after 18
    cached = generate(model, prompts, 40, temperature=0)
    assert cached == generate(model, prompts, 40, temperature=0, cache=False)
    assert [len(row) for row in cached] == [40, 40]


def test_sliding_window_cache_never_grows_past_the_window() -> None:
    model = _model(attention="sliding_window")
    decoder = CachedDecoder(model)
    logits = decoder.prefill(_prompts(9, 4))  # a prefill longer than the window
    for _ in range(12):
        cache = decoder.cache
        assert isinstance(cache, SlidingWindowCache)
        assert cache.pos.size(-1) <= WINDOW
        stored = [*cache.keys.values(), *cache.values.values()]
        assert len(stored) == 2 * model.cfg.n_layers and all(t.size(2) <= WINDOW for t in stored)
        logits = decoder.step(logits.argmax(dim=-1).tolist())


def test_full_cache_grows_by_doubling_within_max_seq_len() -> None:
    decoder = CachedDecoder(_model())
    logits = decoder.prefill(_prompts(3))
    capacities = set()
    for _ in range(MAX_SEQ_LEN - 3):
        capacities.add(decoder.cache.keys[0].size(2))
        logits = decoder.step(logits.argmax(dim=-1).tolist())
    assert capacities == {3, 6, 12, MAX_SEQ_LEN}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("attention", ["mha", "sliding_window"])
def test_batched_prompts_of_different_lengths_decode_as_each_alone(position: str, attention: str) -> None:
    model = _model(position=position, attention=attention)
    prompts = _prompts(3, 9, 1, 9)
    decoder = CachedDecoder(model)
    batched = decoder.prefill(prompts)
    alone = torch.cat([CachedDecoder(model).prefill([p]) for p in prompts])
    torch.testing.assert_close(batched, alone, **TOL)
    expected = [generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert generate(model, prompts, 12, temperature=0) == expected
    assert generate(model, prompts, 12, temperature=0, cache=False) == expected


def test_stop_token_ends_only_its_row() -> None:
    model = _model()
    prompts = _prompts(4, 6)
    free = generate(model, prompts, 10, temperature=0)
    stop = free[0][3]  # row 0 stops at its 4th token (and at any earlier occurrence)
    stopped = generate(model, prompts, 10, temperature=0, stop_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]
    row_1 = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == row_1


def test_sampling_with_a_seeded_generator_is_reproducible_and_matches_recomputation() -> None:
    model = _model(position="alibi")
    prompts = _prompts(5, 2)
    options = dict(temperature=1.0, top_k=10, top_p=0.9)
    seeded = torch.Generator().manual_seed
    runs = [generate(model, prompts, 15, **options, generator=seeded(7), cache=c) for c in (True, True, False)]
    assert runs[0] == runs[1] == runs[2]


def test_generation_restores_training_mode_and_leaves_the_model_unchanged() -> None:
    model = _model().train()
    attention = [block.attention for block in model.blocks]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, _prompts(4), 5, temperature=0)
    assert model.training
    assert [block.attention for block in model.blocks] == attention
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compiled_blocks_generate_eagerly_with_the_same_tokens() -> None:
    model = _model()
    prompts = _prompts(3, 7)
    expected = generate(model, prompts, 8, temperature=0)
    apply_compile(model)  # as LitLM does with compile=true; generation runs it eagerly (no recompiles)
    from torch._dynamo.utils import counters

    counters.clear()
    assert generate(model, prompts, 8, temperature=0) == expected
    assert not counters["stats"]["unique_graphs"], "generation compiled a graph"


def test_empty_prompt_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(_model(), [[1, 2], []], 3)
