"""The run directory `runs/<experiment>/<run-name>/` (DESIGN.md): what it holds and how it is written.

- `run.json`: resolved config, absolute data spec and fingerprint, J* table, tracking URI, MLflow run id;
- `snapshot-<nimg>.pt`: EMA weights (default profile) and how to rebuild the network, kept;
- `checkpoint-<nimg>.pt`: full training state, rotating (the last `KEEP_CHECKPOINTS`);
- `per_sigma.json`, `samples-<nimg>.png`, `log.txt`.
Every file is written atomically, and checkpoints hold only tensors and primitive containers, so they load
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from . import EdmOptError
from .config import parse_nimg
from .contract import RUN_INFO, RunInfo
from .fileio import atomic_path, write_json

KEEP_CHECKPOINTS = 2


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
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
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
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
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


def load_snapshot(path: str | Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"snapshot {path} not found") from None
    except Exception as e:
        raise RunDirError(f"{path}: unreadable snapshot ({type(e).__name__}: {e})") from None
