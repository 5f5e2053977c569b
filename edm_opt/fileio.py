"""Atomic file writes: write to a temporary name in the destination's folder, then rename into place.

Every file edm-opt writes (tables, checkpoints, snapshots, plots, reports) goes through `atomic_path`,
so an interrupted or failed write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


_UMASK = os.umask(0o022)  # read the process umask (setting it back at once)
os.umask(_UMASK)


@contextmanager
def atomic_path(dest: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success rename it to `dest` (with the permissions a plain
    open() would give, not mkstemp's 0600), on error delete it. `fsync`: flush the file to disk before the rename
    (checkpoints: a crash right after cannot leave a renamed but empty file)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(dest: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """Write `obj` as JSON atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    return Path(dest)
