"""Under FSDP2 (two CPU processes, gloo) the ranks sample groups in lockstep: a rank whose rows have all stopped
keeps taking part in the other rank's forwards (each gathers the sharded parameters) until every row has."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmkit.generation import generate
from llmkit.generation.groups import sample_groups
from tests.model.helpers import tiny_model

PROMPTS = [[1, 2, 3], [9, 8, 7, 6]]  # rank r samples PROMPTS[r]
STEPS = 6


def expected() -> tuple[list[int], int]:
    """Greedy completions of each rank's prompt, and a stop token that ends rank 0's row at once but not rank
    1's: rank 0 is done after one step while rank 1 decodes all STEPS."""
    model = tiny_model()
    rows = generate(model, PROMPTS, STEPS, temperature=0)
    stop = rows[0][0]
    assert stop not in rows[1], "pick prompts whose greedy completions differ"
    return rows[1], stop


def worker(rank: int, store: str, stop: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from llmkit.distributed import apply_fsdp

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tiny_model()
        apply_fsdp(model, init_device_mesh("cpu", (2,)))
        completions, truncated = sample_groups(model, [PROMPTS[rank]], 2, STEPS, temperature=0, stop_id=stop)
        torch.save({"completions": completions, "truncated": truncated}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.extended
def test_ranks_decode_in_lockstep_until_every_row_has_stopped(tmp_path: Path) -> None:
    rank1_rows, stop = expected()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(str(tmp_path / "store"), stop, str(tmp_path / "out")), nprocs=2,
                       start_method="spawn", join=True)
    first, second = (torch.load(tmp_path / f"out.{rank}") for rank in (0, 1))
    assert first == {"completions": [[stop], [stop]], "truncated": [False, False]}
    assert second == {"completions": [rank1_rows, rank1_rows], "truncated": [True, True]}
