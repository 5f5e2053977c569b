"""Synthetic training runs logged through `edm_opt.tracking` with the MLflow naming contract.

For tests, `benchmarks/report.py` and trying a report without training. Each run follows
J_sigma(f) = J*_sigma + g_sigma ((f / f0)^alpha + 0.1 (P / 1e5)^-0.5) with multiplicative noise
(per-dimension x0 MSE, f in FLOPs, P parameters: small networks level off higher). It logs the metrics
a training run logs at each status step, the `per_sigma.json` and `jstar.json` artifacts, and optionally
FID/KID at snapshot steps with FID = fid_offset + fid_scale x gap at one sigma (a known relation for
the gap-vs-FID correlation). Loss shares (`sched/share_sigma_<s>`) are s_b = q_b w_b J_b (sigma_b /
0.5)^t / sum: the base density's bin mass q, the EDM weight w, the noise-free loss J and a tilt exponent t.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edm_opt import __version__
from edm_opt import contract as C
from edm_opt.heldout import per_sigma_metrics
from edm_opt.diffusion import EDM_DENSITY, FM_DENSITY, edm_weight, reference_total, sigma_grid
from edm_opt.fileio import write_json
from edm_opt.contract import normalised_share
from edm_opt.tracking import RunLogger, set_run_status

DATA_VARIANCE = 0.29  # per dimension, about that of `digits`
F0 = 1e9  # FLOPs at which the gap equals g_sigma


def synthetic_jstar(sigmas: np.ndarray, sigma_c: float = 0.3) -> np.ndarray:
    """A J*_sigma shaped like a finite dataset's: ~0 below ~sigma_c, the data variance at large sigma."""
    s = np.asarray(sigmas, dtype=np.float64)
    return DATA_VARIANCE * s ** 2 / (DATA_VARIANCE + s ** 2) * -np.expm1(-(s / sigma_c) ** 4)


@dataclass
class SyntheticRun:
    """One run: name, schedule, size (parameters, FLOPs per image), status steps every `status_every`
    images, gap exponent alpha and amplitude; FID every `fid_every` status steps (None: no FID).

    variant: of an `optimal` run, logged as the `opt_variant` param and the `edm_opt.opt_variant` tag (None:
    neither, a run from before variants). params: more params (e.g. {"opt_gamma": 0.5}). seed: the `seed`
    param (None: the noise seed of `log_synthetic_run`). share_tilt: the shares' tilt exponent t (None: 0.5
    for `optimal`, 0 otherwise). shares: log shares (False: a run from before edm-opt logged them).
    """

    name: str
    schedule: str = "edm"
    param_count: int = 100_000
    flops_per_image: float = 1e7
    steps: int = 16
    status_every: int = 512
    alpha: float = -0.3
    amplitude: float = 1.0
    fid_every: int | None = 4
    fid_sigma: int = -3  # grid index whose gap drives FID
    fid_scale: float = 3.0
    fid_offset: float = 5.0
    kid: bool = True
    noise: float = 0.002
    status: str = "FINISHED"
    preset: str = "synthetic"
    base_schedule: str | None = None  # of an `optimal` run, logged as the training runner does
    variant: str | None = None
    params: dict = field(default_factory=dict)
    seed: int | None = None
    share_tilt: float | None = None
    shares: bool = True


def synthetic_history(run: SyntheticRun, sigmas: np.ndarray, jstar: np.ndarray, rng: np.random.Generator) -> dict:
    """The run's `per_sigma.json` content (the format training writes)."""
    nimg = [(i + 1) * run.status_every for i in range(run.steps)]
    flops = np.array(nimg, dtype=np.float64) * run.flops_per_image
    g = run.amplitude * (DATA_VARIANCE * sigmas ** 2 / (DATA_VARIANCE + sigmas ** 2) + 1e-5)
    capacity = 0.1 * (run.param_count / 1e5) ** -0.5  # a smaller network levels off higher
    gap = g[None, :] * ((flops[:, None] / F0) ** run.alpha + capacity)
    loss = (jstar[None, :] + gap) * (1 + run.noise * rng.standard_normal(gap.shape))
    stderr = 0.01 * loss
    shares = synthetic_shares(run, sigmas, jstar[None, :] + gap)
    h = C.PerSigmaHistory(sigmas.tolist(), jstar.tolist(), (1e-3 * jstar).tolist(), run.param_count,
                          int(run.flops_per_image), run.schedule, run.preset)
    for t, n in enumerate(nimg):
        h.append(n, reference_total(sigmas, loss[t]), flops[t], loss_x0=loss[t], stderr=stderr[t],
                 loss_x0_raw=loss[t] * 1.01, loss_x0_batch=loss[t], share=shares[t] if run.shares else None)
    d = h.to_json()
    if not run.shares:
        del d["share"]  # a file from before loss shares existed
    return d


def synthetic_shares(run: SyntheticRun, sigmas: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """[T, K] loss shares of the run at the per-sigma losses `loss` [T, K] (each row sums to 1)."""
    fm = run.schedule == "fm" or run.base_schedule == "fm"
    mass = (FM_DENSITY if fm else EDM_DENSITY).bin_mass(sigmas)
    t = run.share_tilt if run.share_tilt is not None else (0.5 if run.schedule == "optimal" else 0.0)
    weight = edm_weight(sigmas) * (sigmas / 0.5) ** t
    return np.array([normalised_share(mass, weight, row) for row in loss])


def jstar_table(sigmas: np.ndarray, jstar: np.ndarray) -> dict:
    """A `jstar.json` of the DESIGN.md format for synthetic data."""
    return {"format_version": 1, "estimator": "synthetic", "params": {"seed": 0}, "class_conditional": False,
            "num_images": 1000, "dim": 64, "data_variance": DATA_VARIANCE, "wall_time_s": 0.0,
            "edm_opt_version": __version__,
            "dataset": {"source": "synthetic", "resolution": None, "xflip": False, "split": "train",
                        "fingerprint": "synthetic0000", "preprocessing": "none"},
            "sigmas": sigmas.tolist(), "jstar": jstar.tolist(), "stderr": (1e-3 * jstar).tolist()}


def log_synthetic_run(uri: str, experiment: str, run: SyntheticRun, sigmas: np.ndarray | None = None,
                      seed: int = 0, parent_run_id: str | None = None, per_sigma_history: bool = True,
                      artifacts: bool = True) -> str:
    """Log one synthetic run; returns its MLflow run id.

    per_sigma_history: log the per-sigma metrics at every status step (False: at the last step only,
    a smaller store; the report reads `per_sigma.json`). artifacts: log per_sigma.json and jstar.json
    (False: a run whose report must fall back to metric histories).
    """
    sigmas = sigma_grid(num=8) if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    jstar = synthetic_jstar(sigmas)
    rng = np.random.default_rng(seed)
    h = synthetic_history(run, sigmas, jstar, rng)
    tags = {C.TAG_FINGERPRINT: "synthetic0000", C.TAG_SCHEDULE: run.schedule, C.TAG_PRESET: run.preset,
            C.TAG_GIT_COMMIT: "synthetic", C.TAG_DURATION: h["nimg"][-1]}
    if run.schedule == "optimal":
        variant = {"opt_variant": run.variant} if run.variant else {}  # none: a run from before variants
        if run.variant:
            tags[C.TAG_VARIANT] = run.variant
    else:
        variant = {"opt_variant": None}  # as training logs its resolved config for the other schedules
    if parent_run_id:
        tags[C.TAG_SWEEP] = parent_run_id
    logger = RunLogger.create(uri, experiment, run.name, tags, parent_run_id, verbose=False)
    logger.log_params({"preset": run.preset, "schedule": run.schedule, "base_schedule": str(run.base_schedule),
                       "sigmas": f"0.002:80:{len(sigmas)}", "seed": seed if run.seed is None else run.seed,
                       **variant, **run.params,
                       "jstar.estimator": "synthetic", "jstar.ref_total": reference_total(sigmas, jstar)})
    logger.log_metrics({C.PARAM_COUNT: run.param_count, C.FLOPS_PER_IMAGE: run.flops_per_image,
                        **C.sigma_metrics(C.JSTAR, sigmas, jstar)}, step=0)
    loss, stderr = np.array(h["loss_x0"]), np.array(h["stderr"])
    for t, nimg in enumerate(h["nimg"]):
        m = per_sigma_metrics(sigmas, loss[t], stderr[t], jstar, loss[t] * 1.01)
        if not per_sigma_history and t < run.steps - 1:
            m = {k: v for k, v in m.items() if not k.split("/")[1].startswith("sigma_")}
        m.update({C.LOSS_TRAIN: m[C.LOSS_REF], C.FLOPS_TOTAL: h["flops_total"][t], C.LR: 0.01,
                  C.IMG_PER_S: 1000.0})
        if run.shares and (per_sigma_history or t == run.steps - 1):
            m.update(C.sigma_metrics(C.SHARE, sigmas, h["share"][t]))
        if run.fid_every and (t + 1) % run.fid_every == 0:
            fid = run.fid_offset + run.fid_scale * (loss[t, run.fid_sigma] - jstar[run.fid_sigma])
            m[C.FID] = fid * (1 + run.noise * rng.standard_normal())
            m[C.FID_NUM_IMAGES] = 1000
            if run.kid:
                m[C.KID] = 1e-3 * m[C.FID]
        logger.log_metrics(m, step=nimg)
    with tempfile.TemporaryDirectory() as tmp:
        if artifacts:
            logger.log_artifact(write_json(Path(tmp) / C.PER_SIGMA_ARTIFACT, h, indent=None))
            logger.log_artifact(write_json(Path(tmp) / C.JSTAR_ARTIFACT, jstar_table(sigmas, jstar)))
        logger.finish("FINISHED" if run.status == "RUNNING" else run.status)
    if run.status == "RUNNING":
        set_run_status(uri, logger.run_id, "RUNNING")
    return logger.run_id
