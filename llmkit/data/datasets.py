"""The training batch sampler: global batch indices without end."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[int]):
    """Yields batch indices k = start, start + 1, ... without end: training length is counted in
    optimizer steps (trainer.max_steps), so there are no epochs to restart mid-way. The dataset
    maps k to its samples (llmkit/data/streaming.py), and a resume moves the dataset's first sample."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
