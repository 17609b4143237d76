"""Result files written atomically (a temp file in the same folder, then ``os.replace``).

A reader (a summary run by a Hydra callback while other jobs write, or a person) never sees half a file. Run
results are written once and never overwritten (``write_new``); a sweep's own summary is rewritten as jobs end
(``write_replace``). Files get the mode a plain ``open`` would give them (0644 under the usual umask 022), not
``mkstemp``'s private 0600, so colleagues sharing a results folder or a data cache can read them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it to ``path`` (refused if it exists, unless
    ``overwrite``); on error remove it."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists already; results are never overwritten, use a new output dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())  # after the writer: some (safetensors) replace the file with a 0600 one
        if overwrite:
            os.replace(tmp, path)
        else:
            publish_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_new(tmp: Path, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` only if no file has it: a hard link is created or refused in
    one step, so of two runs racing for the same result file one wins and the other is told (no overwrite)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists already; results are never overwritten") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if path.exists():
            raise FileExistsError(f"{path} exists already; results are never overwritten") from None
        os.replace(tmp, path)


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open(path, "w")`` would create (0644 under umask 022)."""
    return mode & ~current_umask()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` alone must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, and put it straight back
    os.umask(mask)
    return mask


def write_new(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically to a file that must not exist yet (no earlier result is overwritten)."""
    with atomic_path(path, overwrite=False) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_replace(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically, replacing an earlier version (a sweep's summary, rewritten as jobs end)."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    return write_new(path, json.dumps(finite(data), indent=2) + "\n")


def finite(value: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
