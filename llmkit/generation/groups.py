"""Groups of samples: several completions of every prompt in one batch, as online RL's rollouts need.

Each prompt is prefilled once and its cache repeated for its `num_samples` rows (the rows of a group
are consecutive), so a group costs one prompt's prefill, not `num_samples`. All rows then decode in
lockstep through the KV-cache decoder (llmkit/generation/decode.py), each stopping at its stop token
or at max_new_tokens (truncated); rows that have stopped leave the decoding batch.

Under FSDP every forward gathers the sharded parameters with collectives, so every rank must run the
same number of decoding steps: a sharded model decodes until the rows of every rank have stopped
(one all-reduce of a flag per step); an unsharded one stops as soon as its own rows have.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from llmkit.generation.decode import CachedDecoder, inference
from llmkit.generation.sampling import check_options, next_tokens
from llmkit.model import Transformer


def sample_groups(
    model: Transformer, prompts: list[list[int]], num_samples: int, max_new_tokens: int, *, temperature: float = 1.0,
    top_p: float | None = None, stop_id: int | None = None, generator: torch.Generator | None = None,
    compact: bool = True,
) -> tuple[list[list[int]], list[bool]]:
    """Every prompt num_samples times -> (completion ids of each of the N = prompts x num_samples rows,
    ending with the stop token where one was sampled; whether each row was cut at max_new_tokens).
    compact: once a quarter of the rows still decoding have stopped, they leave the batch (False: every row
    decodes to the end, the reference); each row's samples are the same either way."""
    check_options(temperature, None, top_p)
    longest = max(map(len, prompts), default=0)
    if not prompts or not all(prompts) or longest + max_new_tokens > model.cfg.max_seq_len + 1:
        raise ValueError(f"sample_groups needs non-empty prompts that leave max_new_tokens={max_new_tokens} of the "
                         f"model's {model.cfg.max_seq_len} positions (the longest has {longest} tokens)")
    with inference(model):  # once for every step: switching a training model's mode walks all its modules
        decoder = CachedDecoder(model, reserve=longest + max_new_tokens)
        logits = decoder.prefill(prompts).repeat_interleave(num_samples, dim=0)  # (N, V)
        decoder.repeat_rows(num_samples)
        rows, device = logits.size(0), logits.device
        columns: list[tuple[Tensor | None, Tensor]] = []  # each step's (rows of the batch, None: all; their samples)
        live: Tensor | None = None  # the row each row of the decoding batch is, once some have left it
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)  # (B,) of the decoding batch
        tokens, lockstep = torch.empty(0, dtype=torch.long, device=device), _sharded(model)  # (B,) the last samples
        for step in range(max_new_tokens):
            if step:
                logits = decoder.step(tokens)
            # every row's uniform draw, stopped or not: a row's samples do not depend on which others stopped
            draws = None if temperature == 0 else torch.rand(rows, 1, generator=generator, device=device)
            tokens = next_tokens(logits, temperature, None, top_p, draws=draws if live is None else draws[live])
            columns.append((live, tokens))
            going = rows if stop_id is None else int(stopped.logical_or_(tokens == stop_id).logical_not().sum())
            if _all_stopped(going == 0, lockstep, device):
                break
            if compact and 0 < going <= 3 * stopped.numel() // 4:  # a copy of the cache, for a quarter less work
                keep = stopped.logical_not().nonzero().squeeze(1)  # (B',) positions in the batch
                decoder.select_rows(keep)
                live = keep if live is None else live[keep]
                stopped, tokens = stopped[keep], tokens[keep]
    return _completions(_sampled(columns, rows).tolist(), stop_id, max_new_tokens)


def _sampled(columns: list[tuple[Tensor | None, Tensor]], rows: int) -> Tensor:
    """(N, steps) every row's samples from each step's (rows of the batch, samples); after a row has left the
    batch, 0 (past its stop token, which ends its completion)."""
    if all(live is None for live, _ in columns):
        return torch.stack([tokens for _, tokens in columns], dim=1)
    out = columns[0][1].new_zeros(rows, len(columns))
    for step, (live, tokens) in enumerate(columns):
        out[live if live is not None else slice(None), step] = tokens
    return out


def _completions(sampled: list[list[int]], stop_id: int | None, limit: int) -> tuple[list[list[int]], list[bool]]:
    """Each row up to and including its first stop token; rows without one are cut at `limit` tokens."""
    out, truncated = [], []
    for row in sampled:
        end = row.index(stop_id) + 1 if stop_id in row else min(len(row), limit)
        out.append(row[:end])
        truncated.append(stop_id not in row[:end])
    return out, truncated


def _sharded(model: Transformer) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1


def _all_stopped(mine: bool, lockstep: bool, device: torch.device) -> bool:
    """Whether decoding can end: this rank's rows have all stopped (and, in lockstep, every rank's)."""
    if not lockstep:
        return mine
    flag = torch.tensor([0 if mine else 1], device=device)
    dist.all_reduce(flag)  # the number of ranks with rows still going
    return int(flag) == 0
