"""Read what an offline W&B run recorded, without uploading it: name, tags, config, summary, media files.

wandb >= 0.2x (wandb-core) writes no ``files/config.yaml`` or ``files/wandb-summary.json`` in offline mode; the
run lives in its transaction log ``offline-run-*/run-<id>.wandb`` until ``wandb sync`` uploads it. That file is
LevelDB's log format (32 KiB blocks of records with a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST,
after a 7-byte ``:W&B`` file header), each record a ``wandb_internal_pb2.Record``. Media (tables, images) are
plain files under ``files/media``. Used by the tests and handy to check a sweep's dashboards before syncing.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
FILE_IDENT, FILE_MAGIC = b":W&B", 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER_SIZE])
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = HEADER_SIZE, b""
    while pos + HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < HEADER_SIZE:  # too small for a header: padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_SIZE])
        if kind == 0:  # zero padding to the end of the block
            pos += left_in_block
            continue
        pending += data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        pos += HEADER_SIZE + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _apply(target: dict[str, Any], items: Any, removals: Any = ()) -> None:
    """Apply a config/summary record's updates (``key`` or a ``nested_key`` path, JSON value) and removals."""
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    for item in removals:
        path = list(item.nested_key) or [item.key]
        node = target
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)


@dataclass
class OfflineRun:
    """The state an offline run would show once synced."""

    run_dir: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def files_dir(self) -> Path:
        return self.run_dir / "files"

    def media(self, key: str) -> Path:
        """The file behind a logged table or image (its summary entry's ``path``)."""
        return self.files_dir / self.summary[key]["path"]

    def table(self, key: str) -> dict[str, Any]:
        """A logged ``wandb.Table``: ``{"columns": [...], "data": [[...], ...]}``."""
        return json.loads(self.media(key).read_text())

    def chart(self, key: str) -> dict[str, Any]:
        """A logged ``wandb.plot`` chart: its panel (``panel_config.panelDefId`` names the chart type)."""
        return self.config["_wandb"]["visualize"][key]

    def chart_table(self, key: str) -> dict[str, Any]:
        """The data a ``wandb.plot`` chart draws (logged as ``<key>_table``)."""
        return self.table(f"{key}_table")


def read_offline_run(run_dir: str | Path, wait_s: float = 20.0) -> OfflineRun:
    """Replay ``run_dir``'s ``run-*.wandb`` log (``run_dir`` = ``.../wandb/offline-run-<time>-<id>``).

    W&B's service process may still be writing the log when the run's ``finish()`` returns: a run that has just
    ended is read again until its exit record is on disk, for up to ``wait_s`` seconds (a busy machine once took
    long enough for a test to read the log before its first record).
    """
    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait_s
    while True:
        run, ended = _replay(run_dir)
        if ended or time.monotonic() >= deadline:
            return run
        time.sleep(0.2)


def _replay(run_dir: Path) -> tuple[OfflineRun, bool]:
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb in {run_dir}")
    run, ended = OfflineRun(run_dir=run_dir), False
    for record in _records(logs[0]):
        kind = record.WhichOneof("record_type")
        ended = ended or kind == "exit"
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            run.tags = list(r.tags)
            _apply(run.config, r.config.update)
        elif kind == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
    return run, ended
