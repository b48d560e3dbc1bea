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
        sampled = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)  # (N, steps)
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        live = torch.arange(rows, device=device)  # the row each row of the decoding batch is
        tokens, lockstep, steps = torch.empty(0, dtype=torch.long, device=device), _sharded(model), 0  # (B,) last samples
        for step in range(max_new_tokens):
            if step:
                logits = decoder.step(tokens)
            # every row's uniform draw, stopped or not: a row's samples do not depend on which others stopped
            draws = None if temperature == 0 else torch.rand(rows, 1, generator=generator, device=device)[live]
            tokens = next_tokens(logits, temperature, None, top_p, draws=draws)  # (B,) of the decoding rows
            sampled[live, step], steps = tokens, step + 1
            if stop_id is not None:
                stopped[live] |= tokens == stop_id
            if _all_stopped(bool(stopped.all()), lockstep, device):
                break
            going = (~stopped[live]).nonzero().squeeze(1)  # (B',) positions in the batch of rows still going
            if compact and 0 < going.numel() <= 3 * live.numel() // 4:  # a cache copy, worth it for 1/4 less work
                decoder.select_rows(going)
                live, tokens = live[going], tokens[going]
    return _completions(sampled[:, :steps].tolist(), stop_id, max_new_tokens)  # (N, steps)


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
