"""Read an offline W&B run back: the `run-<id>.wandb` file is a LevelDB-style log of protobuf
`Record`s (wandb.proto.wandb_internal_pb2). wandb 0.31 has no Python reader for it, so the
framing is parsed here: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
CHUNK_HEADER = 7
FILE_HEADER = 7


def chunks(data: bytes) -> list[bytes]:
    """The payloads of the log, with multi-chunk records joined."""
    records, pending = [], b""
    pos = FILE_HEADER
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            records.append(pending + payload)
            pending = b""
    return records


@dataclass
class OfflineRun:
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def read_offline_run(path: Path) -> OfflineRun:
    out = OfflineRun()
    for payload in chunks(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = {
                "group": record.run.run_group,
                "job_type": record.run.job_type,
                "name": record.run.display_name,
                "tags": list(record.run.tags),
            }
            for item in record.run.config.update:
                out.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            out.history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "summary":
            for item in record.summary.update:
                out.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            out.artifacts.append(record.artifact.name)
        elif kind == "files":
            out.files += [f.path for f in record.files.files]
    return out


def offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("run-*.wandb"))
