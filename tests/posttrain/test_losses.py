"""Post-training losses: sequence log-probs against a loop over positions, DPO's variants and the
Bradley-Terry loss against values worked out by hand, and DPO against TRL's own DPOTrainer code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmkit.posttrain.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, sequence_logprobs

X = -100
LN2 = math.log(2)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- sequence_logprobs ---------------------------------------------------------------------------
def _naive_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(labels.size(0), dtype=torch.float64)
    for b in range(labels.size(0)):
        for t in range(labels.size(1)):
            if labels[b, t] != X:
                out[b] += torch.log_softmax(logits[b, t].double(), dim=-1)[labels[b, t]]
    return out


def _batch(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, 7, 11, generator=g)).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = X  # a prompt
    labels[1, ::2] = X
    labels[2, :] = X  # nothing scored
    return logits, labels


@pytest.mark.parametrize("chunk", [4096, 5])  # one chunk; chunks that do not divide B*T = 21
def test_sequence_logprobs_is_the_loop_over_positions(chunk: int) -> None:
    logits, labels = _batch()
    got = sequence_logprobs(logits, labels, chunk=chunk)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive_logprobs(logits, labels), rtol=1e-5, atol=1e-5)
    assert got[2] == 0  # no scored position
    n = (labels != X).sum(-1).clamp(min=1)
    torch.testing.assert_close(sequence_logprobs(logits, labels, average=True), got / n)


def test_sequence_logprobs_ignores_unscored_positions() -> None:
    logits, labels = _batch()
    changed = logits.clone()
    changed[labels == X] = 100 * torch.randn(int((labels == X).sum()), 11)
    torch.testing.assert_close(sequence_logprobs(changed, labels), sequence_logprobs(logits, labels), rtol=0, atol=0)
    rescored = labels.clone()
    rescored[0, 0] = 4  # a position that was ignored now counts
    assert sequence_logprobs(logits, rescored)[0] < sequence_logprobs(logits, labels)[0]


@pytest.mark.parametrize("chunk", [4096, 5])
def test_sequence_logprobs_gradient(chunk: int) -> None:
    logits, labels = _batch()
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    sequence_logprobs(a, labels, chunk=chunk).sum().backward()
    reference = torch.log_softmax(b, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (reference * (labels != X)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_sequence_logprobs_bf16_is_computed_in_fp32() -> None:
    logits, labels = _batch(torch.bfloat16)
    got = sequence_logprobs(logits, labels)
    assert got.dtype == torch.float32
    exact = _naive_logprobs(logits.float(), labels)  # the bf16 values, in float64
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    in_bf16 = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert (in_bf16.double() * (labels != X)).sum(-1).sub(exact).abs().max() > 1e-3  # bf16 would show


def test_sequence_logprobs_checks_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        sequence_logprobs(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


# ---- DPO -----------------------------------------------------------------------------------------
def test_dpo_is_ln2_at_init() -> None:
    logps = _t(-12.0, -3.5, -40.0)
    for kind, eps in [("sigmoid", 0.0), ("sigmoid", 0.2), ("sigmoid", 0.5), ("robust", 0.0), ("robust", 0.3)]:
        loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3, kind=kind, label_smoothing=eps)
        assert loss.item() == pytest.approx(LN2, abs=1e-12), (kind, eps)
        assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0
    loss, _ = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.25, kind="ipo")
    assert loss.item() == pytest.approx(4.0)  # (0 - 1 / (2 * 0.25))^2


# two pairs: z = (pi_c - pi_r) - (ref_c - ref_r) = (-10 + 12) - (-11 + 11.5) = 1.5 and (-20 + 18) - (-19 + 17) = 0
PAIRS = dict(policy_chosen=_t(-10.0, -20.0), policy_rejected=_t(-12.0, -18.0),
             ref_chosen=_t(-11.0, -19.0), ref_rejected=_t(-11.5, -17.0))


@pytest.mark.parametrize(
    "kind, beta, eps, expected",
    [
        ("sigmoid", 0.1, 0.0, (-_logsig(0.15) + LN2) / 2),
        ("sigmoid", 0.1, 0.2, (-0.8 * _logsig(0.15) - 0.2 * _logsig(-0.15) + LN2) / 2),
        ("robust", 0.1, 0.2, ((-0.8 * _logsig(0.15) + 0.2 * _logsig(-0.15)) / 0.6 + LN2) / 2),
        ("robust", 0.5, 0.1, ((-0.9 * _logsig(0.75) + 0.1 * _logsig(-0.75)) / 0.8 + LN2) / 2),
        ("ipo", 0.1, 0.0, ((1.5 - 5.0) ** 2 + 5.0**2) / 2),  # z itself, not beta * z, against 1 / (2 beta) = 5
        ("ipo", 0.5, 0.0, ((1.5 - 1.0) ** 2 + 1.0**2) / 2),
    ],
)
def test_dpo_by_hand(kind: str, beta: float, eps: float, expected: float) -> None:
    loss, metrics = dpo_loss(**PAIRS, beta=beta, kind=kind, label_smoothing=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # rewards beta * (pi - ref): chosen beta * (1, -1), rejected beta * (-0.5, -1)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0)
    assert metrics["rewards/rejected"].item() == pytest.approx(beta * -0.75)
    assert metrics["rewards/margins"].item() == pytest.approx(beta * 0.75)
    assert metrics["rewards/accuracies"].item() == 0.5  # the tied pair is not counted as right


def test_half_label_smoothing_carries_no_preference() -> None:
    # eps = 0.5: -(logsig(x) + logsig(-x)) / 2 = log(2 cosh(x / 2)), the same for z and -z, ln 2 only at z = 0
    for z in (-7.0, -0.3, 0.0, 2.0, 30.0):
        loss, _ = dpo_loss(_t(z), _t(0.0), _t(0.0), _t(0.0), beta=0.2, label_smoothing=0.5)
        assert loss.item() == pytest.approx(math.log(2 * math.cosh(0.1 * z)), rel=1e-12)


def test_swapping_chosen_and_rejected_flips_the_margin() -> None:
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-30 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    loss, m = dpo_loss(pc, pr, rc, rr)
    swapped, s = dpo_loss(pr, pc, rr, rc)
    assert m["rewards/margins"].item() != 0
    assert s["rewards/margins"].item() == pytest.approx(-m["rewards/margins"].item(), rel=1e-12)
    assert s["rewards/accuracies"].item() == pytest.approx(1 - m["rewards/accuracies"].item())
    assert (s["rewards/chosen"], s["rewards/rejected"]) == (m["rewards/rejected"], m["rewards/chosen"])
    assert swapped.item() != pytest.approx(loss.item())


@pytest.mark.parametrize("kind", DPO_LOSSES.names())
def test_dpo_gradient_reaches_the_policy_only(kind: str) -> None:
    pc, pr, rc, rr = (v.clone().requires_grad_() for v in PAIRS.values())
    loss, metrics = dpo_loss(pc, pr, rc, rr, kind=kind)
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad[0] < 0 < pr.grad[0]  # descending raises the chosen, lowers the rejected
    assert rc.grad is None and rr.grad is None
    assert not any(v.requires_grad for v in metrics.values())


def test_dpo_rejects_bad_arguments() -> None:
    with pytest.raises(KeyError, match="ipo, robust, sigmoid"):
        dpo_loss(**PAIRS, kind="hinge")
    for kind, eps in [("sigmoid", 0.6), ("sigmoid", -0.1), ("robust", 0.5), ("ipo", 0.1)]:
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(**PAIRS, kind=kind, label_smoothing=eps)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(**PAIRS, beta=0.0)


# ---- TRL as the oracle ---------------------------------------------------------------------------
def _trl_dpo(dpo_trainer, kind: str, beta: float, eps: float, pc, pr, rc, rr, n_c, n_r):
    """TRL's DPOTrainer._compute_loss, unbound, on a stand-in trainer and a stand-in model whose
    per-token log-probs sum to the given policy log-probs; the reference ones are precomputed.
    n_c, n_r: completion tokens per reply (only `ipo` reads them). Returns (loss, metrics)."""
    B, T = pc.numel(), int(max(n_c.max(), n_r.max())) + 2
    n = torch.cat([n_c, n_r])  # (2B,)
    completion_mask = (torch.arange(T) >= T - n.unsqueeze(1)).long()  # (2B, T): the last n tokens
    log_probs = torch.zeros(2 * B, T - 1, dtype=pc.dtype)
    log_probs[:, -1] = torch.cat([pc, pr])  # TRL sums the (T - 1) per-token log-probs

    def model(**_kwargs):
        zeros = torch.zeros(2 * B, T - 1)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0], beta=beta,
        label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = dict(input_ids=torch.zeros(2 * B, T, dtype=torch.long), attention_mask=torch.ones(2 * B, T, dtype=torch.long),
                  completion_mask=completion_mask, ref_chosen_logps=rc, ref_rejected_logps=rr)
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}


@pytest.mark.slow  # importing TRL's trainer (transformers' Trainer) takes seconds on its own
def test_dpo_matches_trl() -> None:
    trl = pytest.importorskip("trl", minversion="1.0")  # 1.x: the losses live in DPOTrainer._compute_loss
    import trl.trainer.dpo_trainer as dpo_trainer

    g = torch.Generator().manual_seed(0)
    B = 16
    pc, pr, rc, rr = (-60 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4))
    n_c, n_r = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    tol = dict(rtol=1e-12, atol=1e-12)
    for kind, beta, eps in [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.2), ("robust", 0.3, 0.45)]:
        want, want_metrics = _trl_dpo(dpo_trainer, kind, beta, eps, pc, pr, rc, rr, n_c, n_r)
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, kind=kind, label_smoothing=eps)
        torch.testing.assert_close(loss, want, **tol, msg=f"trl {trl.__version__} {kind} beta={beta} eps={eps}")
        assert metrics.keys() == want_metrics.keys()
        for key, value in metrics.items():
            assert value.item() == pytest.approx(want_metrics[key], rel=1e-12, abs=1e-12), key
    # ipo: TRL divides each reply's log-ratio by its completion length, so ours gets per-token means
    for beta in (0.1, 1.0):
        want, _ = _trl_dpo(dpo_trainer, "ipo", beta, 0.0, pc, pr, rc, rr, n_c, n_r)
        loss, _ = dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=beta, kind="ipo")
        torch.testing.assert_close(loss, want, **tol)
    # TRL 1.x's `sigmoid` ignores label_smoothing; its cDPO formula is `aot` on one pair (sorting one is a no-op)
    for eps in (0.1, 0.5):
        want = torch.stack([_trl_dpo(dpo_trainer, "aot", 0.2, eps, pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1],
                                     n_c[i:i + 1], n_r[i:i + 1])[0] for i in range(B)]).mean()
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, kind="sigmoid", label_smoothing=eps)
        torch.testing.assert_close(loss, want, **tol)


# ---- Bradley-Terry -------------------------------------------------------------------------------
def test_bradley_terry_by_hand() -> None:
    zero = torch.zeros(4, dtype=torch.float64)
    loss, metrics = bradley_terry_loss(zero, zero)
    assert loss.item() == pytest.approx(LN2, abs=1e-12)
    assert metrics["reward/accuracy"].item() == 0 and metrics["reward/margin"].item() == 0
    r_c, r_r, margin = _t(2.0, -1.0, 0.5), _t(1.0, 0.0, 0.5), _t(0.5, 2.0, 1.0)
    loss, metrics = bradley_terry_loss(r_c, r_r)  # r_c - r_r = 1, -1, 0
    assert loss.item() == pytest.approx(-(_logsig(1.0) + _logsig(-1.0) + _logsig(0.0)) / 3, rel=1e-12)
    assert metrics["reward/accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["reward/margin"].item() == pytest.approx(0.0, abs=1e-12)
    loss, metrics = bradley_terry_loss(r_c, r_r, margin)  # the margin moves the target: 1 - 0.5, -1 - 2, 0 - 1
    assert loss.item() == pytest.approx(-(_logsig(0.5) + _logsig(-3.0) + _logsig(-1.0)) / 3, rel=1e-12)
    assert metrics["reward/accuracy"].item() == pytest.approx(1 / 3)  # metrics do not see the margin, as in TRL
    loss, _ = bradley_terry_loss(zero, zero, torch.full((4,), 2.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(-_logsig(-2.0), rel=1e-12)


def test_bradley_terry_gradient() -> None:
    r_c, r_r = _t(0.3, -0.2).requires_grad_(), _t(0.1, 0.4).requires_grad_()
    loss, metrics = bradley_terry_loss(r_c, r_r)
    loss.backward()
    # d/dr_c of -logsig(d) / B is -sigmoid(-d) / B
    expected = -torch.sigmoid(-(r_c - r_r).detach()) / 2
    torch.testing.assert_close(r_c.grad, expected)
    torch.testing.assert_close(r_r.grad, -expected)
    assert not any(v.requires_grad for v in metrics.values())
