"""Benchmark: bytes of parameters, gradients and optimizer state held by each rank, FSDP2
(llmkit.distributed.apply_fsdp) against DDP, on N CPU processes with gloo. FSDP should hold
about 1/N of what DDP holds.

  python scripts/bench_fsdp_memory.py [--world 2] [--d-model 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from llmkit.distributed import apply_fsdp
from llmkit.lit.optim import adamw
from llmkit.model import ModelConfig, Transformer


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor shard or plain tensor
    return local.numel() * local.element_size()


def measure(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=args.d_model, n_layers=args.layers, n_heads=8, max_seq_len=64)
    model = Transformer(cfg)
    if mode == "fsdp":
        apply_fsdp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
        step_model = model
    else:
        step_model = DistributedDataParallel(model)
    optimizer = adamw(model, lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (2, 65))
    logits = step_model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    optimizer.step()
    params = list(model.parameters())
    optim_state = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    results[(mode, rank)] = (
        sum(local_bytes(p) for p in params), sum(local_bytes(p.grad) for p in params if p.grad is not None),
        sum(local_bytes(t) for t in optim_state), sum(p.numel() for p in params),
    )
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with mp.Manager() as manager:
        results = manager.dict()
        for mode in ("ddp", "fsdp"):
            mp.spawn(measure, args=(args.world, free_port(), mode, args, results), nprocs=args.world)
        results = dict(results)
    n_params = results[("ddp", 0)][3]
    print(f"model: {n_params / 1e6:.1f}M parameters (fp32), AdamW, {args.world} ranks (gloo, CPU); bytes per rank")
    print(f"{'':6s} {'rank':>4s} {'params MB':>10s} {'grads MB':>9s} {'optim MB':>9s} {'total MB':>9s} {'vs DDP':>7s}")
    for mode in ("ddp", "fsdp"):
        for rank in range(args.world):
            p, g, o, _ = results[(mode, rank)]
            total = p + g + o
            ddp_total = sum(results[("ddp", rank)][:3])
            mb = [x / 1e6 for x in (p, g, o, total)]
            print(f"{mode:6s} {rank:4d} {mb[0]:10.1f} {mb[1]:9.1f} {mb[2]:9.1f} {mb[3]:9.1f} {total / ddp_total:7.3f}")


if __name__ == "__main__":
    main()
