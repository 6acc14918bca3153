"""Explicit randomness: one master seed, an independent stream per purpose and index.

A stream's seed is a hash of (master seed, stream name, indices), so iteration 37's network
init or real batches do not depend on what ran before it. That keeps runs reproducible without
ever reseeding the global RNG, and lets a resumed run draw exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(master: int, stream: str, *indices: int | str) -> int:
    key = ":".join([str(master), stream, *map(str, indices)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def generator(master: int, stream: str, *indices: int | str) -> torch.Generator:
    """A CPU generator for one stream (sampling indices on the CPU keeps CUDA runs reproducible)."""
    return torch.Generator().manual_seed(derive_seed(master, stream, *indices))
