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
    make = lambda h: torch.randn(2, h, 128, 64, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
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
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def _skip_without_xformers_cuda() -> None:
    xops = pytest.importorskip("xformers.ops")
    probe = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
    try:
        xops.memory_efficient_attention(probe, probe, probe)
    except NotImplementedError:
        pytest.skip(f"xformers {pytest.importorskip('xformers').__version__} has no CUDA kernels for torch {torch.__version__}")
