"""The run directory `runs/<experiment>/<run-name>/` (DESIGN.md): what it holds and how it is written.

- `run.json`: resolved config, absolute data spec and fingerprint, J* table, tracking URI, MLflow run id;
- `snapshot-<nimg>.pt`: EMA weights (default profile) and how to rebuild the network, kept;
- `checkpoint-<nimg>.pt`: full training state, rotating (the last `KEEP_CHECKPOINTS`);
- `per_sigma.json`, `samples-<nimg>.png`, `log.txt`.
Every file is written atomically, and checkpoints hold only tensors and primitive containers, so they load
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from . import EdmOptError
from .config import parse_nimg
from .contract import RUN_INFO, RunInfo
from .fileio import atomic_path, write_json

KEEP_CHECKPOINTS = 2
LOCK_FILE = ".lock"


class RunDirError(EdmOptError, ValueError):
    """A missing or unusable run directory, snapshot or checkpoint."""


def _numbered(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob(f"{prefix}-*.pt"):
        m = re.fullmatch(rf"{prefix}-(\d+)\.pt", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    @property
    def info_path(self) -> Path:
        return self.path / RUN_INFO

    def exists(self) -> bool:
        return self.info_path.exists()

    def read_info(self) -> RunInfo:
        try:
            return RunInfo.from_json(json.loads(self.info_path.read_text()))
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not an edm-opt run directory (no {RUN_INFO})") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise RunDirError(f"{self.info_path}: unreadable ({e})") from None

    def write_info(self, info: RunInfo) -> None:
        write_json(self.info_path, info.to_json())

    # owning the directory ---------------------------------------------------------------------------
    def probe_writable(self) -> Path | None:
        """Create the directory and write a file in it, or RunDirError "cannot write <path>: <reason>" (before any
        MLflow run exists). Returns the topmost folder this created (None if the directory existed)."""
        probe = self.path / ".write-probe"
        new = next((p for p in reversed([self.path, *self.path.parents]) if not p.exists()), None)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with atomic_path(probe) as tmp:
                tmp.write_text("edm-opt\n")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"cannot write {probe.parent}: {e.strerror or e}") from None
        return new

    def remove_if_unused(self, created: Path) -> None:
        """Remove `created` (what probe_writable made) if nothing but the lock file was written under it: a run that
        ended before it started leaves no folder behind."""
        files = [p for p in created.rglob("*") if p.is_file()]
        if all(p == self.path / LOCK_FILE for p in files):
            shutil.rmtree(created, ignore_errors=True)

    def lock(self) -> "RunDirLock":
        """Take the directory for this process (rank 0, for the run's life); RunDirError if another process has it."""
        return RunDirLock(self.path / LOCK_FILE)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what interrupted atomic writes left behind (`.<name>.<random>.tmp`); call with the lock held."""
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def set_aside(self) -> Path:
        """`--restart`: move checkpoints, snapshots and the per-sigma history into `previous-<time>/`."""
        dest = self.path / time.strftime("previous-%Y%m%d-%H%M%S")
        dest.mkdir()
        for p in [*(q for _, q in self.checkpoints()), *(q for _, q in self.snapshots()),
                  *self.path.glob("per_sigma.json"), *self.path.glob("pending-metrics.json")]:
            shutil.move(str(p), dest / p.name)
        return dest

    def log(self, line: str) -> None:
        """Append a line to log.txt (rank 0's status lines)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "log.txt", "a") as f:
            f.write(line + "\n")

    # checkpoints ----------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        return _numbered(self.path, "checkpoint")

    def save_checkpoint(self, state: dict, nimg: int) -> Path:
        path = self.path / f"checkpoint-{nimg:09d}.pt"
        save_atomic(state, path, fsync=True)
        for _, old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self, map_location="cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; a corrupt one is skipped with a warning."""
        for nimg, path in reversed(self.checkpoints()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True), path
            except Exception as e:  # truncated or corrupt file: fall back to the previous one
                print(f"warning: {path} is unreadable ({type(e).__name__}: {e}); trying the previous checkpoint",
                      file=sys.stderr)
        return None

    # snapshots ------------------------------------------------------------------------------------
    def snapshots(self) -> list[tuple[int, Path]]:
        return _numbered(self.path, "snapshot")

    def save_snapshot(self, state: dict, nimg: int) -> Path:
        path = self.path / f"snapshot-{nimg:09d}.pt"
        save_atomic(state, path)
        return path

    def snapshot_path(self, which: str | int = "latest") -> tuple[int, Path]:
        """`latest`, or the snapshot at an image count (`NIMG`, `64Ki`)."""
        snaps = self.snapshots()
        if not snaps:
            raise RunDirError(f"{self.path}: no snapshots yet")
        if which in ("latest", None):
            return snaps[-1]

        nimg = parse_nimg(which)
        for n, p in snaps:
            if n == nimg:
                return n, p
        raise RunDirError(f"{self.path}: no snapshot at {nimg} images (have {', '.join(str(n) for n, _ in snaps)})")


def save_atomic(state: dict, path: Path, fsync: bool = False) -> None:
    """torch.save atomically; a failed write (disk full, read-only, quota) is RunDirError "cannot write PATH: why"."""
    try:
        with atomic_path(path, fsync=fsync) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise RunDirError(f"cannot write {path}: {why}" + (f" ({free / 2 ** 20:.0f} MiB free)" if free is not None
                                                           else "")) from None


class RunDirLock:
    """An exclusive lock on a run directory (flock on its `.lock` file, which names the holder as "PID HOST"). The
    kernel releases it when the holder dies, so a stale lock is taken over (with a warning naming the dead PID)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").split()
            os.close(self.fd)
            who = f"PID {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunDirError(f"run {path.parent} is in use by {who}; wait for it to finish, or give this run "
                              f"another --run-name") from None
        old = os.pread(self.fd, 200, 0).decode(errors="replace").split()
        if len(old) >= 2 and old[1] == socket.gethostname() and old[0].isdigit() and int(old[0]) != os.getpid():
            print(f"warning: taking over the lock of {path.parent} from PID {old[0]}, which is no longer running",
                  file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def load_snapshot(path: str | Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"snapshot {path} not found") from None
    except Exception as e:
        raise RunDirError(f"{path}: unreadable snapshot ({type(e).__name__}: {e})") from None
