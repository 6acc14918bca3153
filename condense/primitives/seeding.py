"""Explicit randomness: one master seed, an independent stream per purpose and index.

A stream's seed is a hash of (master seed, stream name, indices), so iteration 37's network
init or real batches do not depend on what ran before it. That keeps runs reproducible without
ever reseeding the global RNG, and lets a resumed run draw exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def derive_seed(master: int, stream: str, *indices: int | str) -> int:
    key = ":".join([str(master), stream, *map(str, indices)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def generator(master: int, stream: str, *indices: int | str) -> torch.Generator:
    """A CPU generator for one stream (sampling indices on the CPU keeps CUDA runs reproducible)."""
    return torch.Generator().manual_seed(derive_seed(master, stream, *indices))


@dataclass
class EpochWalk:
    """Index batches walked through a shuffled set epoch by epoch, as a persistent shuffled
    DataLoader iterator re-created when exhausted (the last batch of an epoch may be short).
    Epoch e's order comes from the stream (master, name, e), so (epoch, offset) is the whole
    state: a checkpoint keeps two integers."""

    master: int
    name: str
    size: int
    batch: int
    epoch: int = 0
    offset: int = 0

    def next_batch(self) -> torch.Tensor:
        order = torch.randperm(self.size, generator=generator(self.master, self.name, self.epoch))
        picked = order[self.offset : self.offset + self.batch]
        self.offset += self.batch
        if self.offset >= self.size:
            self.epoch, self.offset = self.epoch + 1, 0
        return picked

    def position(self) -> list[int]:
        return [self.epoch, self.offset]
