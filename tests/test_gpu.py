"""CUDA-only checks: kernels agree on the GPU (forward and backward), bf16 training runs."""

import pytest
import torch

from llmkit.model.kernels import KERNELS
from llmkit.model.positions import POSITIONS

pytestmark = pytest.mark.gpu

CASES = [
    dict(n_kv=8, window=None, position="none"),
    dict(n_kv=2, window=None, position="rope"),
    dict(n_kv=8, window=32, position="none"),
    dict(n_kv=2, window=32, position="alibi"),
    dict(n_kv=8, window=None, position="t5"),
]


def _grads(kernel: str, case: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    # drawn in fp32 and then cast, so every dtype sees the same numbers (rounded)
    make = lambda h: torch.randn(2, h, 128, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    q, k, v = make(8), make(case["n_kv"]), make(case["n_kv"])
    pos = torch.arange(128, device="cuda")
    torch.manual_seed(0)
    scheme = POSITIONS.build(case["position"], n_heads=8, head_dim=64).cuda()
    ctx = scheme.context(pos, pos)
    q_rot, k_rot = ctx.rotate_q(q), ctx.rotate_k(k)
    out = KERNELS.get(kernel)(q_rot, k_rot, v, ctx, case["window"], 0.0)
    out.float().square().mean().backward()
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("kernel", ["sdpa", "flex", "xformers"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['n_kv']}-w{c['window']}-{c['position']}")
def test_cuda_kernel_matches_eager_forward_and_backward(kernel: str, case: dict) -> None:
    if kernel == "xformers":
        _skip_without_xformers_cuda()
    # fp32 inputs; fused kernels may use TF32 internally, hence 2e-3 rather than CPU's 1e-5
    for got, want in zip(_grads(kernel, case, torch.float32), _grads("eager", case, torch.float32), strict=True):
        _assert_close_to_scale(got, want, 2e-3)


@pytest.mark.parametrize("kernel", ["sdpa", "xformers"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=["kv8-w32-none", "kv2-w32-alibi"])
def test_cuda_kernel_in_bf16_matches_eager(kernel: str, case: dict) -> None:
    """bf16 takes other paths than fp32 (flash, xformers' sliding-window mask given as a flag)."""
    if kernel == "xformers":
        _skip_without_xformers_cuda()
    for got, want in zip(_grads(kernel, case, torch.bfloat16), _grads("eager", case, torch.float32), strict=True):
        _assert_close_to_scale(got, want, 3e-2)


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Tolerance relative to the tensor's largest entry: the gradients of a mean over 131k outputs are
    ~1e-5, so a fixed atol would pass any gradient at all."""
    scale = want.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(got / scale, want / scale, rtol=tol, atol=tol)


def _skip_without_xformers_cuda() -> None:
    xops = pytest.importorskip("xformers.ops")
    probe = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
    try:
        xops.memory_efficient_attention(probe, probe, probe)
    except NotImplementedError as err:  # e.g. a wheel built for another torch: its reasons, one per kernel
        reasons = " ".join(line.strip() for line in str(err).splitlines() if "because" in line or "xFormers" in line)
        pytest.skip(f"xformers {pytest.importorskip('xformers').__version__} has no CUDA kernel for torch "
                    f"{torch.__version__}: {reasons[:300]}")


TRAIN = [
    "model=gqa_rope", "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "data.max_bytes=200000",
    "data.split=tail", "data.tokenizer=char", "data.seq_len=128", "trainer.max_steps=30", "trainer.val_check_interval=30",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "sample.max_new_tokens=8", "compile=true",
    "scheduler.warmup_steps=5", "optim.lr=3e-3",
]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", [["trainer=gpu"], ["trainer=fsdp", "trainer.devices=1"]], ids=["gpu", "fsdp"])
def test_bf16_compiled_fused_adamw_training_on_one_gpu(trainer: list[str], tmp_path) -> None:
    """The GPU set-ups bench_mfu.py measures: bf16-mixed, compiled blocks, fused AdamW with clipping;
    FSDP2 adds bf16 parameters with fp32 reduction and DTensor parameters for the optimizer."""
    import csv
    import json
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, str(root / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *TRAIN, *trainer, "optim.fused=true"]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and math.isfinite(summary["final_val_loss"]) and summary["mfu"] > 0
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, "the loss falls"
