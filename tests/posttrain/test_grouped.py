"""The update's grouped forward (llmkit/posttrain/grouped.py): each prompt run once for its group gives the plain
forward's logits, per-token log-probs and gradients at every scored position, for every position scheme;
where a cache cannot stand in for the training forward, the plain forward runs."""

import pytest
import torch

from llmkit.generation.decode import CachedDecoder
from llmkit.posttrain.grouped import grouped_logits, policy_logits, runs_groups
from llmkit.posttrain.rl import layout
from llmkit.posttrain.rl_losses import token_entropy, token_logprobs
from tests.model.helpers import VOCAB, tiny_model

# fp32: the cached pass sums each query's keys in another order than the plain causal one (~5e-7 here, as in
# tests/generation/test_decode.py); 1e-5 fails a key at a wrong position or a token fed at the wrong place (~1e-1)
TOL = dict(rtol=1e-5, atol=1e-5)
G = 3


def rollout(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, three completions each of lengths 1 to 4, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (3, 6)]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (1, 4, 2, 3, 4, 1)]
    return layout(prompts, completions, G, pad_id=0)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "t5"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_grouped_logits_and_gradients_are_the_plain_forwards(position: str, kv_heads: int) -> None:
    model = tiny_model(position={"name": position}, attention={"name": "causal", "n_kv_heads": kv_heads}).train()
    ids, labels = rollout()
    scored = labels != -100
    plain = model(ids)
    grouped = grouped_logits(model, ids, labels, G)
    assert grouped.logits.size(1) == 4  # the longest completion, not the (N, T) layout's 10 columns
    torch.testing.assert_close(grouped.logits[grouped.labels != -100], plain[scored], **TOL)
    logps = grouped.logprobs(temperature=0.7)
    torch.testing.assert_close(logps, token_logprobs(plain, labels, 0.7), **TOL)
    assert (logps[~scored] == 0).all()
    torch.testing.assert_close(grouped.entropy(0.7), token_entropy(plain, scored, 0.7), **TOL)
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))  # a loss over every token

    def gradients(logps: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        (logps * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    got, want = gradients(grouped_logits(model, ids, labels, G).logprobs()), gradients(token_logprobs(model(ids), labels))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)  # sums of ~100 terms of up to ~0.1: ~1e-6 off


def test_each_prompt_is_prefilled_once_for_its_group(monkeypatch) -> None:
    model = tiny_model().train()
    ids, labels = rollout()
    prefilled = []
    original = CachedDecoder.prefill
    monkeypatch.setattr(CachedDecoder, "prefill", lambda self, c: prefilled.append([len(p) for p in c]) or original(self, c))
    policy_logits(model, ids, labels, G)
    assert prefilled == [[3, 6]]


def test_compiled_blocks_run_the_plain_forward() -> None:
    from llmkit.distributed import apply_compile

    model = tiny_model().train()
    assert runs_groups(model)
    apply_compile(model)  # not run here: compiling takes long on a CPU
    assert not runs_groups(model)


@pytest.mark.parametrize("change", ["checkpointing", "dropout", "one completion per prompt"])
def test_the_plain_forward_runs_where_a_cache_cannot_stand_in(change: str, monkeypatch) -> None:
    from llmkit.recompute import apply_activation_checkpointing

    model = tiny_model(dropout=0.1 if change == "dropout" else 0.0).train()
    group = 1 if change == "one completion per prompt" else G
    if change == "checkpointing":
        apply_activation_checkpointing(model, "full")
    monkeypatch.setattr(CachedDecoder, "prefill", lambda *a: pytest.fail("the cached path ran"))
    ids, labels = rollout()
    torch.manual_seed(0)
    got = policy_logits(model, ids, labels, group)
    torch.manual_seed(0)
    assert got.columns is None and torch.equal(got.logits, model(ids))  # the same forward, the same dropout draws
