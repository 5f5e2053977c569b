"""Runs of an MLflow experiment as plain arrays, read through `edm_opt.tracking` (the only mlflow user).

One `RunData` per training run: its per-sigma history from the `per_sigma.json` artifact (one file per
run), or, when a run has no such artifact, is still RUNNING (the artifact is written only at
snapshots) or its artifact lacks statuses it logged, from the metric histories of the naming contract.
Units: sigma is the VE noise level, losses are per-dimension x0 MSE (DESIGN.md), f is cumulative
training compute in FLOPs, nimg counts training images seen, shares are fractions of the training signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edm_opt import EdmOptError
from edm_opt import contract as C
from edm_opt.diffusion import reference_total, sigma_key
from edm_opt.tracking import find_runs, get_run, load_json_artifact, metric_history



class NoRunsError(EdmOptError, LookupError):
    """The experiment (or sweep) has no training runs to report on."""


@dataclass
class RunData:
    """One training run: identity, size, and its held-out per-sigma history.

    sigmas [K] (VE); jstar, jstar_stderr [K] (J*_sigma, per-dimension x0 MSE); nimg [T] status steps
    (images seen); flops_total [T] (FLOPs); loss_x0 [T, K] held-out EMA loss (NaN where missing);
    ref_total [T] the reference total of loss_x0; jstar_ref the same total of J*; fid, kid [n, 2]
    (nimg, value) pairs; share [T, K] each grid bin's share of the training signal at each status
    (`sched/share_sigma_<s>`, sums to 1 per status; NaN where the run did not log it). source: where the
    history came from. variant: the optimal schedule's variant (None for other schedules); params: the
    run's MLflow params (strings).
    """

    run_id: str
    name: str
    status: str
    schedule: str
    preset: str
    param_count: int | None
    flops_per_image: float | None
    sigmas: np.ndarray
    jstar: np.ndarray
    jstar_stderr: np.ndarray
    nimg: np.ndarray
    flops_total: np.ndarray
    loss_x0: np.ndarray
    ref_total: np.ndarray
    jstar_ref: float
    fid: np.ndarray
    kid: np.ndarray
    share: np.ndarray
    source: str
    fingerprint: str | None = None
    base_schedule: str | None = None  # what an `optimal` run mixes with and starts from
    variant: str | None = None  # of an `optimal` run: paper, floor, base-below, edm2-tilt
    params: dict = field(default_factory=dict)
    time_ms: int | None = None  # end (else start) time of the run, ms since the epoch
    tags: dict = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [sigma_key(s) for s in self.sigmas]

    @property
    def has_history(self) -> bool:
        return self.nimg.size > 0

    @property
    def gap(self) -> np.ndarray:
        """[T, K] held-out gap J_sigma(theta) - J*_sigma."""
        return self.loss_x0 - self.jstar

    @property
    def ref_gap(self) -> np.ndarray:
        """[T] reference-total gap."""
        return self.ref_total - self.jstar_ref

    def final(self, values: np.ndarray) -> float:
        """The value of a (nimg, value) series at its largest nimg, NaN if empty (e.g. the last FID)."""
        return float(values[-1, 1]) if len(values) else math.nan

    def curve(self, column: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(f, J) for a frontier: f in FLOPs, J = the reference total (column None) or loss_x0 at grid
        column `column`; only finite points with f > 0, J > 0 and f strictly increasing. None if empty."""
        if not self.has_history:
            return None
        J = self.ref_total if column is None else self.loss_x0[:, column]
        f = self.flops_total
        keep = np.isfinite(f) & np.isfinite(J) & (f > 0) & (J > 0)
        f, J = f[keep], J[keep]
        if f.size == 0:
            return None
        rising = np.concatenate([[True], f[1:] > np.maximum.accumulate(f)[:-1]])
        return f[rising], J[rising]


@dataclass
class ExperimentData:
    """The training runs of an experiment (or sweep), the J* table and what is missing."""

    experiment: str
    uri: str
    sweep_run_id: str | None
    runs: list[RunData]
    skipped: list[str]  # names of runs that are not training runs (sweep parents, reports)
    jstar_table: dict | None  # the jstar.json artifact of the first run that has one
    notes: list[str] = field(default_factory=list)

    @property
    def with_history(self) -> list[RunData]:
        return [r for r in self.runs if r.has_history]

    @property
    def reference(self) -> RunData | None:
        """The run whose J* the fits use (the first with a history)."""
        return next(iter(self.with_history), None)

    @property
    def schedules(self) -> list[str]:
        return sorted({r.schedule for r in self.runs})


def _is_training_run(rec) -> bool:
    return C.TAG_SCHEDULE in rec.tags or any(k.startswith(C.LOSS_X0) for k in rec.metrics)


def _series(uri: str, rec, key: str) -> np.ndarray:
    """[n, 2] (step, value) history of one metric, empty if the run never logged it."""
    if key not in rec.metrics:
        return np.zeros((0, 2))
    return np.array(metric_history(uri, rec.run_id, key), dtype=np.float64).reshape(-1, 2)


def _arrays(h: C.PerSigmaHistory, source: str, jstar_ref: float | None = None) -> dict:
    """RunData's history fields from a per-sigma history (contract.PerSigmaHistory)."""
    sigmas = np.asarray(h.sigmas, dtype=np.float64)
    jstar = np.asarray(h.jstar, dtype=np.float64)
    if jstar_ref is None:
        jstar_ref = reference_total(sigmas, jstar) if sigmas.size else math.nan
    return dict(sigmas=sigmas, jstar=jstar, jstar_stderr=np.asarray(h.jstar_stderr, dtype=np.float64),
                nimg=np.asarray(h.nimg, dtype=np.int64), flops_total=np.asarray(h.flops_total, dtype=np.float64),
                loss_x0=h.array("loss_x0"), share=h.array("share"), ref_total=np.asarray(h.ref_total, dtype=np.float64),
                jstar_ref=float(jstar_ref), source=source)


def _from_metrics(uri: str, rec) -> C.PerSigmaHistory:
    """The history from the metric histories (one read per grid sigma and family used, plus two)."""
    return C.PerSigmaHistory.from_metric_histories(rec.metrics, lambda key: metric_history(uri, rec.run_id, key),
                                                   rows=("share",))


def _statuses_missing_from(h: C.PerSigmaHistory, uri: str, rec) -> int:
    """How many status steps logged to MLflow (`loss/ref_total`) the artifact's history does not have."""
    if C.LOSS_REF not in rec.metrics:
        return 0
    logged = {step for step, _ in metric_history(uri, rec.run_id, C.LOSS_REF)}
    return len(logged - set(h.nimg))


def _fill_shares(h: C.PerSigmaHistory, artifact: C.PerSigmaHistory) -> None:
    """Statuses without share metrics take the artifact's shares at the same nimg (shares that live in
    per_sigma.json only, DESIGN.md's layout without --log-per-sigma all). Both on the same grid."""
    row = {n: t for t, n in enumerate(artifact.nimg)}
    for t, n in enumerate(h.nimg):
        if n in row and (h.share[t] is None or all(v is None for v in h.share[t])):
            h.share[t] = artifact.share[row[n]]


def run_variant(schedule: str, params: dict, tags: dict) -> str | None:
    """The optimal schedule's variant: the `opt_variant` param (else the `edm_opt.opt_variant` tag); `paper`
    for an optimal run logged before variants existed; None for the other schedules."""
    if schedule != "optimal":
        return None
    for v in (params.get("opt_variant"), tags.get(C.TAG_VARIANT)):
        if v not in (None, "None", ""):
            return v
    return "paper"


def read_run(uri: str, rec) -> RunData:
    """One run's history: per_sigma.json unless the run is RUNNING, has none, or lacks statuses that the
    run logged to MLflow; else its metric histories."""
    d = None if rec.status == "RUNNING" else load_json_artifact(uri, rec.run_id, C.PER_SIGMA_ARTIFACT)
    try:
        h = C.PerSigmaHistory.from_json(d) if d and d.get("nimg") else None
        arrays = _arrays(h, C.PER_SIGMA_ARTIFACT) if h is not None else None
    except (KeyError, TypeError, ValueError):  # an unreadable artifact: the metrics hold the same numbers
        h = arrays = None
    jref = rec.metrics.get(C.JSTAR_REF)
    if h is not None and (lost := _statuses_missing_from(h, uri, rec)):
        # per_sigma.json was short (written at snapshots only, before edm-opt kept the history in checkpoints,
        # a run resumed before its first snapshot lost its early statuses): the metric histories are whole.
        whole = _from_metrics(uri, rec)
        if len(h.jstar_stderr) == len(whole.sigmas):
            whole.jstar_stderr = h.jstar_stderr
            _fill_shares(whole, h)
        arrays = _arrays(whole, f"metric histories ({C.PER_SIGMA_ARTIFACT} lacks {lost} statuses)", jref)
    if arrays is None:
        whole = _from_metrics(uri, rec)
        arrays = _arrays(whole, "metric histories" if len(whole) else "none", jref)
    h = d or {}
    params = rec.metrics.get(C.PARAM_COUNT, h.get("param_count"))
    schedule = h.get("schedule") or rec.tags.get(C.TAG_SCHEDULE) or rec.params.get("schedule", "unknown")
    return RunData(
        run_id=rec.run_id, name=rec.run_name, status=rec.status, schedule=schedule,
        variant=run_variant(schedule, rec.params, rec.tags), params=dict(rec.params),
        preset=h.get("preset") or rec.tags.get(C.TAG_PRESET) or rec.params.get("preset", "unknown"),
        param_count=None if params is None else int(params),
        flops_per_image=rec.metrics.get(C.FLOPS_PER_IMAGE, h.get("flops_per_image")),
        fid=_series(uri, rec, C.FID), kid=_series(uri, rec, C.KID),
        fingerprint=rec.tags.get(C.TAG_FINGERPRINT) or rec.params.get("data.fingerprint"),
        base_schedule=None if rec.params.get("base_schedule") in (None, "None", "") else rec.params["base_schedule"],
        time_ms=rec.end_time or rec.start_time, tags=rec.tags, **arrays)


OPT_CONSTANTS = ("opt_gamma", "opt_clip_lo", "opt_clip_hi", "opt_tau", "opt_mix")  # label order; then other opt_*


def _param_text(v: str | None) -> str:
    """A param value as a label shows it: numbers with `:g`, anything else as logged ("None" when absent)."""
    try:
        return format(float(v), "g")
    except (TypeError, ValueError):
        return "None" if v in (None, "") else str(v)


def _differing_constants(runs: list[RunData]) -> list[str]:
    """The `opt_*` params (opt_variant aside) whose values differ between `runs`, in label order."""
    keys = {k for r in runs for k in r.params if k.startswith("opt_") and k != "opt_variant"}
    differ = [k for k in keys if len({_param_text(r.params.get(k)) for r in runs}) > 1]
    order = {k: i for i, k in enumerate(OPT_CONSTANTS)}
    return sorted(differ, key=lambda k: (order.get(k, len(order)), k))


def label_optimal_series(runs: list[RunData]) -> list[RunData]:
    """Name the `optimal` runs' series so that runs are pooled only with runs of the same schedule.

    One variant and no differing constant: `optimal`, or `optimal/<base>` when the runs mix with more than
    one base schedule (the names of reports before variants). Otherwise the series key is the variant, the
    base schedule and the `opt_*` constants that differ between the optimal runs of that variant:
    `optimal[floor, gamma=0.5]/edm2` (constants without the `opt_` prefix, values with `:g`)."""
    optimal = [r for r in runs if r.schedule == "optimal"]
    by_variant: dict[str, list[RunData]] = {}
    for r in optimal:
        by_variant.setdefault(r.variant or "paper", []).append(r)
    differ = {v: _differing_constants(rs) for v, rs in by_variant.items()}
    if len(by_variant) <= 1 and not any(differ.values()):
        if len({r.base_schedule for r in optimal}) > 1:
            for r in optimal:
                if r.base_schedule:
                    r.schedule = f"optimal/{r.base_schedule}"
        return runs
    for variant, rs in by_variant.items():
        for r in rs:
            inside = [variant] + [f"{k.removeprefix('opt_')}={_param_text(r.params.get(k))}" for k in differ[variant]]
            r.schedule = f"optimal[{', '.join(inside)}]" + (f"/{r.base_schedule}" if r.base_schedule else "")
    return runs


def collect_experiment(uri: str, experiment: str, sweep_run_id: str | None = None) -> ExperimentData:
    """Read every training run of `experiment` (children of `sweep_run_id` only, when given).

    Runs are ordered by schedule, parameter count and name. Raises NoRunsError if there is none
    (TrackingError if the experiment or the sweep run does not exist).
    """
    if sweep_run_id:
        get_run(uri, sweep_run_id)
    records = find_runs(uri, experiment, sweep_run_id)
    training = [r for r in records if _is_training_run(r)]
    where = f"experiment {experiment!r}" + (f" (sweep {sweep_run_id})" if sweep_run_id else "") + f" at {uri}"
    if not training:
        other = f" ({len(records)} other runs: sweep parents or reports)" if records else ""
        raise NoRunsError(f"no training runs in {where}{other}")
    runs = sorted(label_optimal_series([read_run(uri, r) for r in training]),
                  key=lambda r: (r.schedule, r.param_count or 0, r.name, r.run_id))
    exp = ExperimentData(experiment, uri, sweep_run_id, runs,
                         sorted(r.run_name for r in records if not _is_training_run(r)), None)
    for r in runs:
        if r.has_history and (table := load_json_artifact(uri, r.run_id, C.JSTAR_ARTIFACT)):
            exp.jstar_table = table
            break
    _check_consistency(exp)
    return exp


def _check_consistency(exp: ExperimentData) -> None:
    """Notes for runs without data and runs whose data or J* differ from the reference run."""
    ref = exp.reference
    empty = [r.name for r in exp.runs if not r.has_history]
    if empty:
        exp.notes.append(f"{len(empty)} runs have no held-out evaluation yet: {', '.join(empty[:5])}"
                         + (" ..." if len(empty) > 5 else ""))
    short = [r.name for r in exp.runs if r.source.startswith("metric histories (")]
    if short:
        exp.notes.append(f"{len(short)} runs read from metric histories ({C.PER_SIGMA_ARTIFACT} lacks logged "
                         f"statuses): {', '.join(short[:5])}" + (" ..." if len(short) > 5 else ""))
    if ref is None:
        return
    prints = {r.fingerprint for r in exp.runs if r.fingerprint}
    if len(prints) > 1:
        exp.notes.append(f"runs on {len(prints)} different datasets (fingerprints); fits use the J* of {ref.name}")
    other_jstar = [r.name for r in exp.with_history if not math.isclose(r.jstar_ref, ref.jstar_ref, rel_tol=1e-6)]
    if other_jstar:
        exp.notes.append(f"{len(other_jstar)} runs use another J* reference total than {ref.name}")
