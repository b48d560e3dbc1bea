"""Groups of samples (llmkit/generation/groups.py): one prefill per prompt, repeated rows that decode as each
row would alone, per-row stopping and truncation."""

import pytest
import torch

from llmkit.generation import CachedDecoder, generate
from llmkit.generation.groups import sample_groups
from tests.model.helpers import VOCAB, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, as tests/generation/test_decode.py: sums in another order, ~5e-7


def _prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("attention", [{}, {"window": 3}])
@pytest.mark.parametrize("lengths", [(5, 5), (3, 6, 4)])  # aligned, and left-padded (per-row positions)
def test_repeated_rows_decode_as_the_rows_prefilled_one_by_one(lengths: tuple[int, ...], attention: dict) -> None:
    model = tiny_model(attention={"name": "causal", **attention}).eval()
    prompts, times = _prompts(*lengths), 3
    grouped, each = CachedDecoder(model), CachedDecoder(model)
    logits = grouped.prefill(prompts).repeat_interleave(times, dim=0)
    grouped.repeat_rows(times)
    rows = [p for p in prompts for _ in range(times)]
    torch.testing.assert_close(logits, each.prefill(rows), **TOL)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):  # the rows of a group diverge: each its own tokens
        tokens = torch.randint(0, VOCAB, (len(rows),), generator=gen).tolist()
        torch.testing.assert_close(grouped.step(tokens), each.step(tokens), **TOL)


@pytest.mark.parametrize("attention", [{}, {"window": 3}])
def test_selected_rows_decode_as_those_rows_alone(attention: dict) -> None:
    model = tiny_model(attention={"name": "causal", **attention}).eval()
    prompts = _prompts(3, 6, 4)  # left-padded: per-row positions
    batch, kept = CachedDecoder(model), CachedDecoder(model)
    batch.prefill(prompts)
    kept.prefill([prompts[2], prompts[0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        tokens = torch.randint(0, VOCAB, (3,), generator=gen)
        batch.step(tokens)
        kept.step(tokens[[2, 0]])
    batch.select_rows(torch.tensor([2, 0]))  # row 1 has stopped
    for _ in range(3):
        tokens = torch.randint(0, VOCAB, (2,), generator=gen)
        torch.testing.assert_close(batch.step(tokens), kept.step(tokens), **TOL)


@pytest.mark.parametrize("lengths", [(5, 5, 5), (3, 6, 4)])
def test_stopped_rows_leave_the_batch_and_every_row_samples_as_without_that(lengths: tuple[int, ...], monkeypatch) -> None:
    model = tiny_model(max_seq_len=64).eval()
    prompts = _prompts(*lengths)
    batch_sizes = []
    original = CachedDecoder.step
    monkeypatch.setattr(CachedDecoder, "step", lambda self, t: batch_sizes.append(len(t)) or original(self, t))
    run = lambda compact: sample_groups(model, prompts, 8, 40, stop_id=5, compact=compact,  # noqa: E731
                                        generator=torch.Generator().manual_seed(0))
    reference = run(compact=False)
    assert set(batch_sizes) == {24}
    batch_sizes.clear()
    assert run(compact=True) == reference
    assert min(batch_sizes) < 24 * 3 // 4 and batch_sizes == sorted(batch_sizes, reverse=True)  # it shrank, more than once
    stopped = sum(not cut for cut in reference[1])
    assert 12 < stopped < 24  # the stop token (one of 37) came within 40 tokens in most rows, not in all


def test_greedy_groups_are_the_greedy_generation_of_every_row_and_one_prefill_serves_a_group(monkeypatch) -> None:
    model = tiny_model().eval()
    prompts = _prompts(4, 7)
    prefilled = []
    original = CachedDecoder.prefill
    monkeypatch.setattr(CachedDecoder, "prefill", lambda self, c: prefilled.append(len(c)) or original(self, c))
    completions, truncated = sample_groups(model, prompts, 2, 5, temperature=0)
    assert prefilled == [2]  # the two prompts, not their four rows
    want = generate(model, [p for p in prompts for _ in range(2)], 5, temperature=0)
    assert completions == want and truncated == [True] * 4


def test_sampled_groups_follow_the_generator_and_each_row_stops_at_its_stop_token() -> None:
    model = tiny_model().eval()
    prompts = _prompts(3, 5)
    first = sample_groups(model, prompts, 4, 8, generator=torch.Generator().manual_seed(3))
    again = sample_groups(model, prompts, 4, 8, generator=torch.Generator().manual_seed(3))
    assert first == again
    stop = first[0][0][1]  # a token that row 0 sampled second: make it the stop token
    completions, truncated = sample_groups(model, prompts, 4, 8, stop_id=stop, generator=torch.Generator().manual_seed(3))
    for row, cut, free in zip(completions, truncated, first[0], strict=True):
        if stop in free:  # the same draws up to the row's first stop token, which ends it
            assert row == free[: free.index(stop) + 1] and not cut
        else:
            assert row == free and cut and len(row) == 8
    assert completions[0] == first[0][0][:2]


def test_prompts_that_leave_no_room_are_refused() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="max_new_tokens=10 .* 24 positions .* 20 tokens"):
        sample_groups(model, _prompts(20), 2, 10)
    with pytest.raises(ValueError, match="non-empty prompts"):
        sample_groups(model, [[]], 2, 1)
