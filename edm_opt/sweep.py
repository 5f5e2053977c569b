"""Sweep files: a grid of training runs, expanded into cells, planned, and the cells' state (edm_opt.launch runs them).

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
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from . import contract as C
from .config import ConfigError, TrainConfig, format_nimg, load_yaml, parse_nimg, resolve_config
from .rundir import RunDir
from .tracking import TrackingError, default_tracking_uri, find_runs, sqlite_path

TOP_KEYS = ("name", "description", "experiment", "launch", "base", "grid", "overrides")
LAUNCH_MODES = ("subprocess", "torchrun")
SWEEP_OWNED = {  # options each cell gets from the sweep, not from the file
    "experiment": "use the top-level key `experiment`",
    "run_name": "cells are named like `edm-opt train` names runs",
    "parent_run_id": "the sweep's MLflow run is every cell's parent",
    "cell_hash": "the sweep computes it",
}
_FIELDS = {f.name: f.default for f in fields(TrainConfig)}


@dataclass
class Launch:
    """How each cell runs (edm_opt.launch): `subprocess` (python -m edm_opt.cli train --config FILE) or
    `torchrun` (nproc_per_node ranks on this node, started by edm_opt.localrun: torchrun's environment, every
    socket on 127.0.0.1)."""

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

    def config_path(self, cell: Cell) -> Path:
        """The resolved config the cell's `train --config` reads, written when the cell starts."""
        return self.folder / f"{cell.run_name}.yaml"


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


def cell_config(cell: Cell, parent_run_id: str) -> TrainConfig:
    """What a cell trains: its resolved config under the sweep's parent run."""
    return dataclasses.replace(cell.resolved, parent_run_id=parent_run_id)


def config_text(cfg: TrainConfig) -> str:
    """A config as the YAML `edm-opt train --config` reads (image counts as 64Ki/8Mi where exact)."""
    d = {k: format_nimg(int(v)) if k in TrainConfig.NIMG_KEYS and v is not None else v
         for k, v in cfg.to_dict().items()}
    return yaml.safe_dump(d, sort_keys=False)


def cell_command(sweep: Sweep, cell: Cell) -> list[str]:
    """The command line that runs `cell`: `edm-opt train --config <its config file>`, its ranks started by
    `edm_opt.localrun` (torchrun's variables, every socket on 127.0.0.1) for torchrun launches (what --dry-run
    prints; the file is written when the cell starts)."""
    prefix = [sys.executable, "-m"]
    if sweep.launch.mode == "torchrun":
        prefix += ["edm_opt.localrun", f"--nproc_per_node={sweep.launch.nproc_per_node}", "-m"]
    return prefix + ["edm_opt.cli", "train", "--config", str(sweep.config_path(cell))]


def format_plan(sweep: Sweep, cells: list[Cell] | None = None) -> str:
    """What `sweep run --dry-run` prints: each cell (default all) with its run name, run directory and
    command line (its config file is written when the cell starts, with the parent run's id)."""
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
    db = sqlite_path(uri)
    return db is None or db.exists()


def find_records(uri: str, experiment: str, filter_string: str = "") -> list:
    """The experiment's runs, oldest first; none if the store or the experiment does not exist yet."""
    if not _store_exists(uri):
        return []
    try:
        return find_runs(uri, experiment, filter_string=filter_string)
    except TrackingError:  # no such experiment yet
        return []
    except Exception as e:
        raise TrackingError(f"cannot read MLflow experiment {experiment!r} at {uri} "
                            f"({type(e).__name__}: {e})") from None


def read_state(sweep: Sweep) -> dict:
    try:
        return json.loads((sweep.folder / "sweep.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def cell_statuses(sweep: Sweep, uri: str | None = None) -> list[CellStatus]:
    """Every cell's state from its run directory (checkpoints, run.json), MLflow and sweep.json.

    Reads only: a SQLite store that does not exist yet is not created.
    """
    uri = uri or default_tracking_uri()
    records = find_records(uri, sweep.experiment)
    by_id = {r.run_id: r for r in records}
    by_hash = {r.tags[C.TAG_CELL_HASH]: r for r in records if C.TAG_CELL_HASH in r.tags}  # newest wins
    attempts = read_state(sweep).get("cells", {})
    return [cell_status(c, uri, by_id, by_hash, attempts.get(c.run_name, {}).get("state")) for c in sweep.cells]


def cell_status(cell: Cell, uri: str, by_id: dict | None = None, by_hash: dict | None = None,
                last_attempt: str | None = None) -> CellStatus:
    """One cell's state. `by_id`/`by_hash`: its MLflow records by run id and cell hash (none: run.json only);
    `last_attempt`: the outcome sweep.json records for it."""
    run = RunDir(cell.run_dir)
    ckpts = run.checkpoints() if run.path.is_dir() else []
    nimg = ckpts[-1][0] if ckpts else 0
    info = None
    if run.exists():
        with contextlib.suppress(Exception):
            info = run.read_info()
    run_id, run_uri = (info.mlflow_run_id, info.tracking_uri) if info else (None, None)
    rec = (by_id or {}).get(run_id) or (by_hash or {}).get(cell.cell_hash)
    duration = cell.config.duration
    if nimg >= duration or (not ckpts and rec is not None and rec.status == "FINISHED"
                            and int(rec.tags.get(C.TAG_DURATION, 0)) >= duration):
        state = "finished"
    elif (rec is not None and rec.status == "FAILED") or (last_attempt == "failed" and
                                                         (rec is None or rec.status != "RUNNING")):
        state = "failed"
    elif rec is not None and rec.status == "RUNNING":
        state = "running"
    elif ckpts or rec is not None or info is not None:
        state = "partial"
    else:
        state = "not started"
    return CellStatus(cell, state, nimg, rec.run_id if rec else run_id, run_uri or (uri if rec else None),
                      dict(rec.metrics) if rec else {})


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
                     c.run_name, s.state, images, f"{m[C.GAP_REF]:.5f}" if C.GAP_REF in m else "-",
                     f"{m[C.FID]:.2f}" if C.FID in m else "-"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    counts = Counter(s.state for s in statuses)
    lines.append(f"sweep {sweep.name} ({sweep.experiment}): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(lines)


def _show(key: str, value) -> str:
    return format_nimg(value) if key in TrainConfig.NIMG_KEYS and isinstance(value, int) else str(value)


