"""Sweep files: a grid of training runs, expanded into cells, launched one after another, resumed.

A sweep file (YAML, format in `sweeps/README.md`) holds a base config, a grid and optional overrides. Each
cell of the grid is one training run, named as `edm-opt train` names it (`<preset>-<schedule>-s<seed>-<hash>`,
the hash leaving out the duration and intervals), so a cell resumes, or is found finished, exactly as the
same `train` command would. Image counts (durations, intervals) are in images and accept `Ki`/`Mi`.

The sweep is one MLflow parent run `sweep-<name>`; every cell is a child run tagged `edm_opt.cell_hash`.
The same sweep is the same name and the same set of cells, each cell identified by its config hash (together:
`sweep_hash`): re-running it, or running it with longer durations or another launch mode, reuses its
parent run; changing what any cell computes (a new seed, another learning rate) starts a new parent run.
Cells that an earlier definition (or a plain `train` command) already trained are resumed or skipped, and
their MLflow runs are moved under the current parent (a run has one parent).

Cells run one after another (SQLite allows one writer at a time). Each cell's output goes to
`<outdir>/<experiment>/sweep-<name>/<run name>.log`, logged as an artifact of the parent and of the cell's
run; `sweep.json` next to it records the outcome of each cell's last attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from .config import ConfigError, TrainConfig, format_nimg, load_yaml, parse_nimg, resolve_config
from .fileio import write_json

TOP_KEYS = ("name", "description", "experiment", "launch", "base", "grid", "overrides")
LAUNCH_MODES = ("subprocess", "torchrun", "inprocess")
SWEEP_OWNED = {  # options each cell gets from the sweep, not from the file
    "experiment": "use the top-level key `experiment`",
    "run_name": "cells are named like `edm-opt train` names runs",
    "parent_run_id": "the sweep's MLflow run is every cell's parent",
    "cell_hash": "the sweep computes it",
}
_FIELDS = {f.name: f.default for f in fields(TrainConfig)}
# boolean options whose negative flag is not --no-<name>
_NEGATIVE_FLAGS = {"class_conditional": "--unconditional"}


@dataclass
class Launch:
    """How each cell runs: `subprocess` (python -m edm_opt.cli train ...), `torchrun` (nproc_per_node
    ranks on this node) or `inprocess` (edm_opt.training.train in the sweep's own process)."""

    mode: str = "subprocess"
    nproc_per_node: int = 1  # torchrun only
    env: dict[str, str] = field(default_factory=dict)  # extra environment of subprocess/torchrun cells


@dataclass
class Cell:
    """One training run of the sweep."""

    index: int  # 1-based position in the sweep
    label: str  # its grid coordinates, e.g. "preset=edm2-nano schedule=optimal"
    options: dict  # the options the file sets for it (base, grid point, overrides), underscore keys
    config: TrainConfig  # `options` with the sweep's experiment, run name and cell hash; what is launched
    resolved: TrainConfig  # `config` with every default filled in (resolve_config)

    @property
    def run_name(self) -> str:
        return self.config.run_name

    @property
    def cell_hash(self) -> str:
        return self.config.cell_hash

    @property
    def run_dir(self) -> Path:
        return Path(self.config.outdir) / self.config.experiment / self.config.run_name


@dataclass
class Sweep:
    """A parsed, validated sweep file and its cells (in grid order, the first grid key varying slowest)."""

    path: Path
    name: str
    experiment: str
    description: str
    launch: Launch
    base: dict
    grid: dict  # axis -> list of option mappings (a scalar value v of axis k is {k: v})
    cells: list[Cell]

    @property
    def sweep_hash(self) -> str:
        """12 hex digits over the cells' config hashes: what the cells compute, not their durations."""
        return hashlib.sha256(",".join(sorted(c.cell_hash for c in self.cells)).encode()).hexdigest()[:12]

    @property
    def folder(self) -> Path:
        """`<outdir>/<experiment>/sweep-<name>`: cell logs and `sweep.json`."""
        return Path(self.base.get("outdir", _FIELDS["outdir"])) / self.experiment / f"sweep-{self.name}"

    @property
    def run_name(self) -> str:
        return f"sweep-{self.name}"

    def log_path(self, cell: Cell) -> Path:
        return self.folder / f"{cell.run_name}.log"


# --------------------------------------------------------------------------------------------------
# Reading a sweep file


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file and expand its cells; ConfigError naming the file and key otherwise.

    Every cell is resolved (`resolve_config`: presets, defaults, run names) but no data is loaded.
    """
    path = Path(path)
    doc = load_yaml(path, "sweep file")
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (a sweep file has {', '.join(TOP_KEYS)}; "
                              f"training options go under `base`)")
    name = str(doc.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{path}: name {name!r} may only contain letters, digits, '.', '_' and '-'")
    experiment = str(doc.get("experiment") or name)
    launch = _parse_launch(doc.get("launch", "subprocess"), f"{path}: launch")
    base = _options(doc.get("base") or {}, f"{path}: base")
    grid = _parse_grid(doc.get("grid"), path)
    overrides = _parse_overrides(doc.get("overrides") or [], path)
    cells = _expand(path, experiment, launch, base, grid, overrides)
    return Sweep(path, name, experiment, str(doc.get("description") or "").strip(), launch, base, grid, cells)


def _options(d, where: str) -> dict:
    """A mapping of training options with underscore keys; unknown and sweep-owned keys are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key in SWEEP_OWNED:
            raise ConfigError(f"{where}: {k!r} is set by the sweep ({SWEEP_OWNED[key]})")
        if key not in _FIELDS:
            TrainConfig.from_dict({k: v}, source=where)  # raises "unknown option" with a did-you-mean hint
        out[key] = v
    return out


def _parse_launch(value, where: str) -> Launch:
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected one of {', '.join(LAUNCH_MODES)} or a mapping "
                          f"{{mode: torchrun, nproc_per_node: N, env: {{...}}}}")
    unknown = set(value) - {"mode", "nproc_per_node", "env"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (launch has mode, nproc_per_node, env)")
    launch = Launch(str(value.get("mode", "subprocess")), value.get("nproc_per_node", 1), value.get("env") or {})
    if launch.mode not in LAUNCH_MODES:
        raise ConfigError(f"{where}: mode {launch.mode!r} is not one of {', '.join(LAUNCH_MODES)}")
    if not isinstance(launch.nproc_per_node, int) or isinstance(launch.nproc_per_node, bool) \
            or launch.nproc_per_node < 1:
        raise ConfigError(f"{where}: nproc_per_node must be a positive integer, got {launch.nproc_per_node!r}")
    if launch.nproc_per_node > 1 and launch.mode != "torchrun":
        raise ConfigError(f"{where}: nproc_per_node needs mode torchrun")
    if not isinstance(launch.env, dict):
        raise ConfigError(f"{where}: env must be a mapping NAME: value")
    if launch.env and launch.mode == "inprocess":
        raise ConfigError(f"{where}: env applies to subprocess and torchrun cells, not inprocess ones")
    launch.env = {str(k): str(v) for k, v in launch.env.items()}
    return launch


def _parse_grid(grid, path: Path) -> dict:
    if not grid:
        raise ConfigError(f"{path}: grid is empty; give at least one option with a list of values "
                          f"(one cell: `grid: {{seed: [0]}}`)")
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid must be a mapping of option: [values]")
    axes = {}
    for axis, values in grid.items():
        where = f"{path}: grid.{axis}"
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: expected a non-empty list of values, got {values!r}")
        # a mapping sets several options at once (the axis name is then only a label)
        axes[str(axis)] = [_options(v if isinstance(v, dict) else {axis: v}, where) for v in values]
    return axes


def _parse_overrides(overrides, path: Path) -> list[tuple[dict, dict]]:
    if not isinstance(overrides, list):
        raise ConfigError(f"{path}: overrides must be a list of {{match: {{...}}, set: {{...}}}}")
    out = []
    for i, o in enumerate(overrides):
        where = f"{path}: overrides[{i}]"
        if not isinstance(o, dict) or set(o) != {"match", "set"}:
            raise ConfigError(f"{where}: expected exactly the keys match and set, got {o!r}")
        match = _options(o["match"], f"{where}.match")
        match = {k: [_normalise(k, x) for x in (v if isinstance(v, list) else [v])] for k, v in match.items()}
        out.append((match, _options(o["set"], f"{where}.set")))
    return out


def _normalise(key: str, value):
    """Image counts to integers so that `64Ki` matches 65536."""
    if key in TrainConfig.NIMG_KEYS and value is not None:
        try:
            return parse_nimg(value)
        except ConfigError:
            return value
    return value


def _expand(path: Path, experiment: str, launch: Launch, base: dict, grid: dict,
            overrides: list[tuple[dict, dict]]) -> list[Cell]:
    cells, used, names = [], [False] * len(overrides), {}
    world = launch.nproc_per_node if launch.mode == "torchrun" else 1
    for point in itertools.product(*grid.values()):
        options = dict(base)
        for p in point:
            options.update(p)
        label = " ".join(f"{k}={v}" for p in point for k, v in p.items())
        for i, (match, set_) in enumerate(overrides):
            if all(_normalise(k, options.get(k, _FIELDS[k])) in values for k, values in match.items()):
                options.update(set_)
                used[i] = True
        where = f"{path}: cell {label}"
        cfg = TrainConfig.from_dict({**options, "experiment": experiment}, source=where)
        try:
            resolved = resolve_config(cfg, world)
        except ConfigError as e:
            ranks = f" (launch.nproc_per_node {world})" if world > 1 else ""
            raise ConfigError(f"{where}{ranks}: {e}") from None
        if resolved.run_name in names:
            raise ConfigError(f"{path}: cells {names[resolved.run_name]} and {label} are the same run "
                              f"{resolved.run_name}: they differ only in options left out of the run name "
                              f"(duration, intervals, output)")
        names[resolved.run_name] = label
        cell_hash = hashlib.sha256(json.dumps(resolved.hashed(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        config = dataclasses.replace(cfg, run_name=resolved.run_name, cell_hash=cell_hash)
        resolved = dataclasses.replace(resolved, cell_hash=cell_hash)
        cells.append(Cell(len(cells) + 1, label, options, config, resolved))
    for i, u in enumerate(used):
        if not u:
            raise ConfigError(f"{path}: overrides[{i}] matches no cell (match {overrides[i][0]})")
    return cells


# --------------------------------------------------------------------------------------------------
# Command lines


def train_args(cfg: TrainConfig, keys) -> list[str]:
    """`edm-opt train` options for the given keys of `cfg`: booleans as --flag/--no-flag, None left out,
    image counts as 64Ki/8Mi where exact."""
    args = []
    for key in keys:
        value = getattr(cfg, key)
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else _NEGATIVE_FLAGS.get(key, "--no-" + key.replace("_", "-")))
        elif key in TrainConfig.NIMG_KEYS:
            args += [flag, format_nimg(int(value))]
        else:
            args += [flag, str(value)]
    return args


def cell_command(sweep: Sweep, cell: Cell, parent_run_id: str = "SWEEP_RUN_ID") -> list[str]:
    """The command line that runs `cell` (subprocess and torchrun launches; what --dry-run prints)."""
    if sweep.launch.mode == "torchrun":
        torchrun = Path(sys.executable).with_name("torchrun")
        prefix = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        prefix += ["--standalone", f"--nproc_per_node={sweep.launch.nproc_per_node}", "-m", "edm_opt.cli", "train"]
    else:
        prefix = [sys.executable, "-m", "edm_opt.cli", "train"]
    return prefix + _cell_args(cell, parent_run_id)


def _cell_args(cell: Cell, parent_run_id: str) -> list[str]:
    cfg = dataclasses.replace(cell.config, parent_run_id=parent_run_id)
    return train_args(cfg, [*cell.options, "experiment", "run_name", "parent_run_id", "cell_hash"])


def format_plan(sweep: Sweep, cells: list[Cell] | None = None) -> str:
    """What `sweep run --dry-run` prints: each cell (default all) with its run name, run directory and
    command line (`SWEEP_RUN_ID` stands for the parent run's id, known once the sweep runs)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sweep.launch.env.items())
    lines = [f"sweep {sweep.name}: {len(sweep.cells)} cells, experiment {sweep.experiment}, "
             f"launch {sweep.launch.mode}" + (f" x{sweep.launch.nproc_per_node}" if sweep.launch.mode == "torchrun"
                                               else "") + f", sweep hash {sweep.sweep_hash}",
             f"  logs in {sweep.folder}"]
    for cell in sweep.cells if cells is None else cells:
        lines += [f"[{cell.index}/{len(sweep.cells)}] {cell.label}",
                  f"    run {cell.run_name}  ({format_nimg(cell.resolved.duration)} images, batch "
                  f"{cell.resolved.batch}, cell hash {cell.cell_hash})",
                  f"    dir {cell.run_dir}"]
        if sweep.launch.mode == "inprocess":
            lines.append("    in process: edm-opt train " + shlex.join(_cell_args(cell, "SWEEP_RUN_ID")))
        else:
            lines.append("    " + (env + " " if env else "") + shlex.join(cell_command(sweep, cell)))
    return "\n".join(lines)


def select_cells(sweep: Sweep, spec: str) -> list[Cell]:
    """Cells by 1-based index, range or run name: "3", "1,4-6", "edm2-nano-edm2-s0-107971"."""
    chosen = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        by_name = {c.index for c in sweep.cells if part in (c.run_name, c.cell_hash)}
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if by_name:
            chosen |= by_name
        elif m and 1 <= int(m.group(1)) <= int(m.group(2) or m.group(1)) <= len(sweep.cells):
            chosen |= set(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
        else:
            raise ConfigError(f"{sweep.path}: no cell {part!r} (cells are 1..{len(sweep.cells)} or run names; "
                              f"see --dry-run)")
    return [c for c in sweep.cells if c.index in chosen]


# --------------------------------------------------------------------------------------------------
# State of the cells: run directories, MLflow, the sweep's own record


@dataclass
class CellStatus:
    """Where one cell stands. state: not started | running | partial | failed | finished."""

    cell: Cell
    state: str
    nimg: int  # images trained, from the newest checkpoint (0: none here)
    run_id: str | None  # the cell's MLflow run
    tracking_uri: str | None  # the store that run is in
    metrics: dict  # latest values of the run's metrics


def _store_exists(uri: str) -> bool:
    """False for a SQLite store that does not exist yet (reading must not create it)."""
    from .tracking import sqlite_path

    db = sqlite_path(uri)
    return db is None or db.exists()


def _records(uri: str, experiment: str, filter_string: str = "") -> list:
    """The experiment's runs, oldest first; none if the store or the experiment does not exist yet."""
    from .tracking import TrackingError, find_runs

    if not _store_exists(uri):
        return []
    try:
        return find_runs(uri, experiment, filter_string=filter_string)
    except TrackingError:  # no such experiment yet
        return []
    except Exception as e:
        raise TrackingError(f"cannot read MLflow experiment {experiment!r} at {uri} "
                            f"({type(e).__name__}: {e})") from None


def _read_state(sweep: Sweep) -> dict:
    try:
        return json.loads((sweep.folder / "sweep.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def cell_statuses(sweep: Sweep, uri: str | None = None) -> list[CellStatus]:
    """Every cell's state from its run directory (checkpoints, run.json), MLflow and sweep.json.

    Reads only: a SQLite store that does not exist yet is not created.
    """
    from .tracking import default_tracking_uri

    uri = uri or default_tracking_uri()
    records = _records(uri, sweep.experiment)
    by_id = {r.run_id: r for r in records}
    by_hash = {r.tags["edm_opt.cell_hash"]: r for r in records if "edm_opt.cell_hash" in r.tags}  # newest wins
    attempts = _read_state(sweep).get("cells", {})
    return [cell_status(c, uri, by_id, by_hash, attempts.get(c.run_name, {}).get("state")) for c in sweep.cells]


def cell_status(cell: Cell, uri: str, by_id: dict | None = None, by_hash: dict | None = None,
                last_attempt: str | None = None) -> CellStatus:
    """One cell's state. `by_id`/`by_hash`: its MLflow records by run id and cell hash (none: run.json only);
    `last_attempt`: the outcome sweep.json records for it."""
    from .rundir import RunDir

    run = RunDir(cell.run_dir)
    ckpts = run.checkpoints() if run.path.is_dir() else []
    nimg = ckpts[-1][0] if ckpts else 0
    info = {}
    if run.exists():
        with contextlib.suppress(Exception):
            info = run.read_info()
    rec = (by_id or {}).get(info.get("mlflow_run_id")) or (by_hash or {}).get(cell.cell_hash)
    duration = cell.config.duration
    if nimg >= duration or (not ckpts and rec is not None and rec.status == "FINISHED"
                            and int(rec.tags.get("edm_opt.duration", 0)) >= duration):
        state = "finished"
    elif (rec is not None and rec.status == "FAILED") or (last_attempt == "failed" and
                                                         (rec is None or rec.status != "RUNNING")):
        state = "failed"
    elif rec is not None and rec.status == "RUNNING":
        state = "running"
    elif ckpts or rec is not None or info:
        state = "partial"
    else:
        state = "not started"
    return CellStatus(cell, state, nimg, rec.run_id if rec else info.get("mlflow_run_id"),
                      info.get("tracking_uri") or (uri if rec else None), dict(rec.metrics) if rec else {})


def format_status(sweep: Sweep, statuses: list[CellStatus]) -> str:
    """The table of `sweep status`: grid coordinates, run name, state, images trained, final metrics."""
    varying = [k for k in dict.fromkeys(k for c in sweep.cells for k in c.options)
               if k not in ("preset", "schedule", "seed")
               and len({json.dumps(c.options.get(k), default=str) for c in sweep.cells}) > 1]
    head = ["#", "preset", "schedule", "seed", *varying, "run name", "state", "images", "gap/ref_total", "fid"]
    rows = []
    for s in statuses:
        c, r = s.cell, s.cell.resolved
        images = f"{format_nimg(s.nimg)}/{format_nimg(r.duration)}" if s.nimg else "-"
        m = s.metrics
        rows.append([str(c.index), r.preset, r.schedule, str(r.seed), *[_show(k, getattr(r, k)) for k in varying],
                     c.run_name, s.state, images, f"{m['gap/ref_total']:.5f}" if "gap/ref_total" in m else "-",
                     f"{m['fid']:.2f}" if "fid" in m else "-"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    counts = Counter(s.state for s in statuses)
    lines.append(f"sweep {sweep.name} ({sweep.experiment}): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(lines)


def _show(key: str, value) -> str:
    return format_nimg(value) if key in TrainConfig.NIMG_KEYS and isinstance(value, int) else str(value)


# --------------------------------------------------------------------------------------------------
# Running


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
    from .tracking import default_tracking_uri

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
    from .tracking import create_run, git_commit, log_now, set_run_status

    def find() -> list[str]:  # oldest first
        return [r.run_id for r in _records(uri, sweep.experiment, f"tags.`edm_opt.sweep_hash` = '{sweep.sweep_hash}'")
                if r.run_name == sweep.run_name]

    found = find()
    tags = {"edm_opt.sweep_name": sweep.name, "edm_opt.sweep_hash": sweep.sweep_hash,
            "edm_opt.sweep_file": str(sweep.path.resolve()), "edm_opt.sweep_cells": len(sweep.cells),
            "edm_opt.sweep_launch": sweep.launch.mode, "edm_opt.git_commit": git_commit()}
    if sweep.description:
        tags["mlflow.note.content"] = sweep.description
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
            log_now(uri, parent, tags={"edm_opt.duplicate_of": oldest})
            set_run_status(uri, parent, "KILLED")
            parent = oldest
        echo(f"sweep {sweep.name}: new MLflow run {parent} ({len(sweep.cells)} cells) in experiment {sweep.experiment}")
    log_now(uri, parent, artifacts=[sweep.path])
    return parent


def _launch(sweep: Sweep, cell: Cell, parent: str, uri: str, log: Path) -> tuple[str, int | None]:
    """Run one cell with its output appended to `log`: ('finished' | 'failed' | 'stopped', exit status)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep {sweep.name}, cell {cell.label}\n")
        if sweep.launch.mode == "inprocess":
            return _launch_inprocess(cell, parent, f)
        cmd = cell_command(sweep, cell, parent)
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        # progress bars in a log file: one update per 30 s, not thousands of carriage returns (tqdm reads TQDM_*)
        env = {"TQDM_MININTERVAL": "30", **os.environ, **sweep.launch.env, "MLFLOW_TRACKING_URI": uri,
               "PYTHONUNBUFFERED": "1"}
        try:  # a session of its own: Ctrl-C reaches the sweep only, which then asks the cell once to stop
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
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


def _launch_inprocess(cell: Cell, parent: str, f) -> tuple[str, int | None]:
    from .training import train

    cfg = dataclasses.replace(cell.config, parent_run_id=parent)
    with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            out = train(cfg, echo=lambda line: print(line, file=f, flush=True))
        except KeyboardInterrupt:
            return "stopped", None
        except Exception:
            traceback.print_exc(file=f)
            return "failed", 1
    return ("stopped" if out.get("status") == "stopped" else "finished"), 0


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


def _die_with_parent() -> None:
    """In a cell's process (Linux): SIGTERM when the sweep dies, even by SIGKILL, so that no orphaned cell
    goes on training into a run directory that the next sweep would train into too."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _adopt(status: CellStatus, parent: str, uri: str, finished: bool = False) -> None:
    """Put the cell's MLflow run under this sweep's parent (it may come from an earlier definition or a
    plain `train` command); a cell trained to its duration is marked FINISHED. Runs in another store
    than the sweep's are left alone."""
    from .tracking import get_run, log_now, set_run_status

    if not status.run_id or status.tracking_uri != uri:
        return
    with contextlib.suppress(Exception):  # best effort: the run may be gone
        rec = get_run(uri, status.run_id)
        if rec.tags.get("mlflow.parentRunId") != parent or rec.tags.get("edm_opt.cell_hash") != status.cell.cell_hash:
            log_now(uri, status.run_id, tags={"mlflow.parentRunId": parent, "edm_opt.sweep": parent,
                                              "edm_opt.cell_hash": status.cell.cell_hash})
        if finished and rec.status != "FINISHED":
            set_run_status(uri, status.run_id, "FINISHED")


def _record_attempt(status: CellStatus, parent: str, uri: str, log: Path, outcome: str, echo) -> None:
    """After a cell ran: its log on the parent and on its own run, the run adopted; FAILED if it failed."""
    from .tracking import TrackingError, get_run, log_now, set_run_status

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
    state = _read_state(sweep)
    state.update({"name": sweep.name, "experiment": sweep.experiment, "sweep_hash": sweep.sweep_hash,
                  "parent_run_id": parent, "tracking_uri": uri})
    state.setdefault("cells", {}).update(cell or {})
    if last_run:
        state["last_run"] = last_run
    return write_json(sweep.folder / "sweep.json", state)


def _finish_parent(sweep: Sweep, uri: str, parent: str, result: SweepResult, final: str, echo) -> None:
    from .tracking import TrackingError, log_now, set_run_status

    try:
        path = _save_state(sweep, parent, uri, last_run={
            "status": final, "trained": result.trained, "skipped": result.skipped, "failed": result.failed,
            "elapsed_s": round(result.elapsed_s, 1)})
        log_now(uri, parent, metrics={"sweep/cells_finished": len(result.trained) + len(result.skipped),
                                      "sweep/cells_failed": len(result.failed)}, artifacts=[path])
    except (TrackingError, OSError) as e:
        echo(f"warning: {e}")
    set_run_status(uri, parent, final)
