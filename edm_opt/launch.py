"""Running a sweep: its cells one after another, each a supervised `edm-opt train` process, under one MLflow parent.

Finished cells are skipped without a process; the others resume from their newest checkpoint. Each cell's
process runs in a session of its own (Ctrl-C reaches the sweep, which asks the cell once to checkpoint and stop)
and dies with the sweep (PR_SET_PDEATHSIG), so no orphaned cell trains on. Outcomes go to `sweep.json`, the
cell's log to the parent's and the cell's artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import contract as C
from .config import format_nimg
from .distributed import die_with_parent
from .fileio import atomic_path, write_json
from .sweep import (Cell, CellStatus, Sweep, cell_command, cell_config, cell_status, cell_statuses, config_text,
                    find_records, read_state)
from .tracking import TrackingError, create_run, default_tracking_uri, get_run, git_commit, log_now, set_run_status


@dataclass
class SweepResult:
    """What one `sweep run` did; run names per outcome."""

    parent_run_id: str
    trained: list[str] = field(default_factory=list)  # trained to the end now
    skipped: list[str] = field(default_factory=list)  # already finished
    failed: list[str] = field(default_factory=list)
    stopped: bool = False  # interrupted (Ctrl-C / SIGTERM): the running cell wrote a checkpoint
    elapsed_s: float = 0.0


def run_sweep(sweep: Sweep, echo: Callable[[str], None] = print, cells: list[Cell] | None = None) -> SweepResult:
    """Run every unfinished cell (of `cells`, default all), one after another, under one MLflow parent run.

    Finished cells are skipped without starting a process; unfinished ones resume from their newest
    checkpoint. A failing cell is recorded (FAILED, log artifact) and the sweep goes on. The parent ends
    KILLED (interrupted), FAILED (a cell failed) or FINISHED (every cell of the sweep finished; when only
    some cells were run and others are not finished yet, it stays RUNNING).
    """
    t_start = time.monotonic()
    uri = default_tracking_uri()
    parent = _parent_run(sweep, uri, echo)
    result = SweepResult(parent)
    selected = {c.index for c in (sweep.cells if cells is None else cells)}
    n = len(sweep.cells)
    final = "FAILED"  # unless the loop below ends normally
    try:
        with _stop_signals_interrupt():
            for status in cell_statuses(sweep, uri):
                cell = status.cell
                if cell.index not in selected:
                    continue
                prefix = f"[{cell.index}/{n}] {cell.run_name}"
                if status.state == "finished":
                    _adopt(status, parent, uri, finished=True)
                    result.skipped.append(cell.run_name)
                    echo(f"{prefix}: skipped (finished, {format_nimg(max(status.nimg, cell.config.duration))} images)")
                    continue
                log = sweep.log_path(cell)
                echo(f"{prefix}: {'resuming at ' + format_nimg(status.nimg) if status.nimg else 'starting'} "
                     f"({cell.label}; log {log})")
                t0 = time.monotonic()
                outcome, returncode = _launch(sweep, cell, parent, uri, log)
                elapsed = time.monotonic() - t0
                _save_state(sweep, parent, uri, cell={cell.run_name: {
                    "state": outcome, "returncode": returncode, "elapsed_s": round(elapsed, 1), "log": str(log),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}})
                _record_attempt(cell_status(cell, uri), parent, uri, log, outcome, echo)
                line = f"{prefix}: {outcome} in {_minutes(elapsed)}"
                if outcome == "failed":
                    result.failed.append(cell.run_name)
                    line += f" (exit status {returncode}; see {log})"
                elif outcome == "finished":
                    result.trained.append(cell.run_name)
                echo(line)
                if outcome == "stopped":
                    result.stopped = True
                    break
        final = "KILLED" if result.stopped else "FAILED" if result.failed else "FINISHED"
        if final == "FINISHED" and cells is not None \
                and any(st.state != "finished" for st in cell_statuses(sweep, uri)):
            final = "RUNNING"  # other cells are still to run (e.g. by other jobs of a cluster)
    except KeyboardInterrupt:
        result.stopped, final = True, "KILLED"
    finally:
        result.elapsed_s = time.monotonic() - t_start
        _finish_parent(sweep, uri, parent, result, final, echo)
    echo(summary(sweep, result))
    return result


def summary(sweep: Sweep, result: SweepResult) -> str:
    """The closing lines of `sweep run`."""
    done = len(result.trained) + len(result.skipped) + len(result.failed)
    lines = [f"sweep {sweep.name}: {len(result.trained)} trained, {len(result.skipped)} already finished, "
             f"{len(result.failed)} failed, {len(sweep.cells) - done} not run, in {_minutes(result.elapsed_s)}; "
             f"MLflow run {result.parent_run_id}"]
    lines += [f"  FAILED {name}: see {sweep.folder / (name + '.log')}" for name in result.failed]
    if result.stopped:
        lines.append("  stopped; run the same command again to resume")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _parent_run(sweep: Sweep, uri: str, echo) -> str:
    """The sweep's MLflow run (same name and sweep hash), reused and marked RUNNING, or a new one."""
    def find() -> list[str]:  # oldest first
        return [r.run_id for r in find_records(uri, sweep.experiment, f"tags.`edm_opt.sweep_hash` = '{sweep.sweep_hash}'")
                if r.run_name == sweep.run_name]

    found = find()
    tags = {C.TAG_SWEEP_NAME: sweep.name, C.TAG_SWEEP_HASH: sweep.sweep_hash, C.TAG_SWEEP_FILE: str(sweep.path.resolve()),
            C.TAG_SWEEP_CELLS: len(sweep.cells), C.TAG_SWEEP_LAUNCH: sweep.launch.mode, C.TAG_GIT_COMMIT: git_commit()}
    if sweep.description:
        tags[C.TAG_NOTE] = sweep.description
    if found:
        parent = found[0]
        set_run_status(uri, parent, "RUNNING")
        log_now(uri, parent, tags=tags)
        echo(f"sweep {sweep.name}: continuing MLflow run {parent} ({len(sweep.cells)} cells)")
    else:
        parent = create_run(uri, sweep.experiment, sweep.run_name, tags)
        grid = {f"grid.{axis}": json.dumps([p if list(p) != [axis] else p[axis] for p in points], default=str)
                for axis, points in sweep.grid.items()}
        log_now(uri, parent, params={"n_cells": len(sweep.cells), **grid})
        oldest = find()[0]
        if oldest != parent:  # another job created it at the same moment: all use the oldest
            log_now(uri, parent, tags={C.TAG_DUPLICATE_OF: oldest})
            set_run_status(uri, parent, "KILLED")
            parent = oldest
        echo(f"sweep {sweep.name}: new MLflow run {parent} ({len(sweep.cells)} cells) in experiment {sweep.experiment}")
    log_now(uri, parent, artifacts=[sweep.path])
    return parent


def _launch(sweep: Sweep, cell: Cell, parent: str, uri: str, log: Path) -> tuple[str, int | None]:
    """Run one cell with its output appended to `log`: ('finished' | 'failed' | 'stopped', exit status).

    The cell's resolved config goes to its config file first (`Sweep.config_path`), which `train --config` reads."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep {sweep.name}, cell {cell.label}\n")
        config = sweep.config_path(cell)
        with atomic_path(config) as tmp:
            tmp.write_text(config_text(cell_config(cell, parent)))
        cmd = cell_command(sweep, cell)
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        # off a terminal every progress bar is a plain line every 30 s (edm_opt.progress)
        env = {**os.environ, **sweep.launch.env, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
        try:  # a session of its own: Ctrl-C reaches the sweep only, which then asks the cell once to stop
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=die_with_parent)
        except OSError as e:
            f.write(f"cannot start {cmd[0]}: {e}\n")
            return "failed", None
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the trainer writes a checkpoint at the end of its step
            try:
                rc = proc.wait()
            except KeyboardInterrupt:  # again: stop now
                proc.kill()
                rc = proc.wait()
            return "stopped", rc
    return ("finished" if rc == 0 else "failed"), rc


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_interrupt():
    """SIGTERM (a cluster scheduler) and SIGHUP (a closed terminal) stop the sweep like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _adopt(status: CellStatus, parent: str, uri: str, finished: bool = False) -> None:
    """Put the cell's MLflow run under this sweep's parent (it may come from an earlier definition or a
    plain `train` command); a cell trained to its duration is marked FINISHED. Runs in another store
    than the sweep's are left alone."""
    if not status.run_id or status.tracking_uri != uri:
        return
    with contextlib.suppress(Exception):  # best effort: the run may be gone
        rec = get_run(uri, status.run_id)
        if rec.tags.get(C.TAG_PARENT) != parent or rec.tags.get(C.TAG_CELL_HASH) != status.cell.cell_hash:
            log_now(uri, status.run_id, tags={C.TAG_PARENT: parent, C.TAG_SWEEP: parent,
                                              C.TAG_CELL_HASH: status.cell.cell_hash})
        if finished and rec.status != "FINISHED":
            set_run_status(uri, status.run_id, "FINISHED")


def _record_attempt(status: CellStatus, parent: str, uri: str, log: Path, outcome: str, echo) -> None:
    """After a cell ran: its log on the parent and on its own run, the run adopted; FAILED if it failed."""
    try:
        log_now(uri, parent, artifacts=[(log, "logs")])
        _adopt(status, parent, uri)
        if status.run_id and status.tracking_uri:
            log_now(status.tracking_uri, status.run_id, artifacts=[(log, "logs")])
            if outcome == "failed" and get_run(status.tracking_uri, status.run_id).status == "RUNNING":
                set_run_status(status.tracking_uri, status.run_id, "FAILED")  # killed before it could say so
    except TrackingError as e:
        echo(f"  warning: {e}")


def _save_state(sweep: Sweep, parent: str, uri: str, cell: dict | None = None, last_run: dict | None = None) -> Path:
    """Update sweep.json (read afresh: jobs running other cells of the same sweep write it too)."""
    state = read_state(sweep)
    state.update({"name": sweep.name, "experiment": sweep.experiment, "sweep_hash": sweep.sweep_hash,
                  "parent_run_id": parent, "tracking_uri": uri})
    state.setdefault("cells", {}).update(cell or {})
    if last_run:
        state["last_run"] = last_run
    return write_json(sweep.folder / "sweep.json", state)


def _finish_parent(sweep: Sweep, uri: str, parent: str, result: SweepResult, final: str, echo) -> None:
    try:
        path = _save_state(sweep, parent, uri, last_run={
            "status": final, "trained": result.trained, "skipped": result.skipped, "failed": result.failed,
            "elapsed_s": round(result.elapsed_s, 1)})
        log_now(uri, parent, metrics={C.SWEEP_CELLS_FINISHED: len(result.trained) + len(result.skipped),
                                      C.SWEEP_CELLS_FAILED: len(result.failed)}, artifacts=[path])
    except (TrackingError, OSError) as e:
        echo(f"warning: {e}")
    set_run_status(uri, parent, final)
