"""Per-sigma x0 loss and gap of any denoiser on the fixed held-out set (DESIGN.md "Held-out set").

The held-out set is a fixed subset of the *training* images (J* is the floor on the training set):
`per_sigma` images per grid sigma with their noise, both drawn from a generator seeded by a constant,
so every run on a dataset, and every later diagnosis of its snapshots, sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import reference_total, sigma_key

HELDOUT_SEED = 20250616  # fixed: the same held-out samples for every run on a dataset


@dataclass
class HeldOutSet:
    """x0 [K*n, C, H, W] in [-1, 1], noise eps of the same shape, sigma [K*n] (n per grid sigma, grouped)."""

    sigmas: np.ndarray
    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    labels: torch.Tensor | None  # one-hot, for class-conditional networks
    per_sigma: int

    @classmethod
    def build(cls, dataset, sigmas: np.ndarray, per_sigma: int = 64, class_conditional: bool = False) -> "HeldOutSet":
        seed = int.from_bytes(hashlib.sha256(f"{HELDOUT_SEED}/{dataset.fingerprint}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed & (2 ** 63 - 1))
        k = len(sigmas)
        idx = torch.randint(dataset.num_images, (k * per_sigma,), generator=g)
        noise = torch.randn(k * per_sigma, *dataset.images.shape[1:], generator=g)
        x0 = dataset.images[idx].float() / 127.5 - 1
        sigma = torch.tensor(np.repeat(sigmas, per_sigma), dtype=torch.float32)
        labels = None
        if class_conditional:
            labels = torch.nn.functional.one_hot(dataset.labels[idx], dataset.num_classes).float()
        return cls(np.asarray(sigmas, dtype=np.float64), x0, noise, sigma, labels, per_sigma)


@torch.no_grad()
def per_sample_x0_error(net, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                        labels: torch.Tensor | None) -> torch.Tensor:
    """||D(x0 + sigma eps; sigma) - x0||^2 / D per sample (float64), in VE x0 coordinates."""
    s = sigma.reshape(-1, 1, 1, 1)
    d = net(x0 + s * noise, sigma, labels)
    return (d.float() - x0).double().square().flatten(1).mean(1)


@torch.no_grad()
def heldout_losses(net, heldout: HeldOutSet, device, batch_size: int = 512, rank: int = 0, world_size: int = 1,
                   all_reduce=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sigma held-out x0 loss (per dimension) and its standard error, in eval mode.

    With several ranks each evaluates a strided share and `all_reduce` (in-place sum of a CPU tensor)
    combines per-bin sums; every rank returns the same numbers.
    """
    was_training = net.training
    net.eval()  # EDM2: never run training mode here, it would rewrite the weights
    k, n = len(heldout.sigmas), heldout.per_sigma
    stats = torch.zeros(2, k, dtype=torch.float64)  # sum, sum of squares per bin
    mine = torch.arange(rank, k * n, world_size)
    for i in range(0, len(mine), batch_size):
        j = mine[i:i + batch_size]
        labels = None if heldout.labels is None else heldout.labels[j].to(device)
        err = per_sample_x0_error(net, heldout.x0[j].to(device), heldout.noise[j].to(device),
                                  heldout.sigma[j].to(device), labels).cpu()
        b = j // n
        stats[0].index_add_(0, b, err)
        stats[1].index_add_(0, b, err * err)
    if all_reduce is not None:
        all_reduce(stats)
    net.train(was_training)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
    return mean.numpy(), (var / n).sqrt().numpy()


def per_sigma_metrics(sigmas: np.ndarray, loss: np.ndarray, stderr: np.ndarray, jstar: np.ndarray,
                      raw_loss: np.ndarray | None = None) -> dict[str, float]:
    """DESIGN.md's per-sigma metric keys and reference totals for one evaluation."""
    m = {}
    for i, s in enumerate(sigmas):
        key = sigma_key(s)
        m[f"loss_x0/sigma_{key}"] = float(loss[i])
        m[f"stderr/sigma_{key}"] = float(stderr[i])
        m[f"gap/sigma_{key}"] = float(loss[i] - jstar[i])
        if raw_loss is not None:
            m[f"loss_x0_raw/sigma_{key}"] = float(raw_loss[i])
    ref, jref = reference_total(sigmas, loss), reference_total(sigmas, jstar)
    m.update({"loss/ref_total": ref, "jstar/ref_total": jref, "gap/ref_total": ref - jref})
    return m


def negative_gaps(sigmas, loss, stderr, jstar, z: float = 3.0) -> list[str]:
    """Grid sigmas where the held-out loss is below J* by more than z standard errors (a bug, or wrong J*)."""
    bad = (loss - jstar) < -z * np.maximum(stderr, 1e-12)
    return [f"sigma={sigma_key(s)}: loss {l:.4g} < J* {j:.4g} - {z:g} x {e:.2g}"
            for s, l, j, e, b in zip(sigmas, loss, jstar, stderr, bad) if b]


def largest_gap(sigmas, gap) -> tuple[float, float]:
    i = int(np.nanargmax(gap))
    return float(sigmas[i]), float(gap[i])


# --------------------------------------------------------------------------------------------------
# Per-sigma gap against FID across snapshots (the paper's Figure 2b).


@dataclass(frozen=True)
class GapFidPoint:
    """One (run, snapshot) with FID: the held-out per-sigma gap J_sigma(theta) - J*_sigma (per-dimension x0
    MSE) of the evaluation at the same nimg, keyed by sigma key (`format(s, ".4g")`), and the FID there."""

    run_id: str
    run_name: str
    nimg: int
    fid: float
    gap: dict[str, float]


@dataclass(frozen=True)
class GapFidCorrelation:
    """Correlation across (run, snapshot) points of the gap at one sigma with FID (n points used)."""

    sigma: float
    pearson: float
    spearman: float
    n: int


def match_gap_fid(run_id: str, run_name: str, sigmas, nimg, gap, fid) -> list[GapFidPoint]:
    """Pair each FID with the per-sigma gap evaluated at the same nimg.

    sigmas [K]; nimg [T] the steps of the held-out evaluations; gap [T][K] (None or NaN where missing);
    fid: (nimg, FID) pairs. FID steps without an evaluation at exactly that nimg are skipped.
    """
    row_at = {int(n): i for i, n in enumerate(nimg)}
    keys = [sigma_key(s) for s in sigmas]
    points = []
    for step, value in fid:
        i = row_at.get(int(step))
        if i is None or not np.isfinite(value):
            continue
        g = {k: float(v) for k, v in zip(keys, gap[i]) if v is not None and np.isfinite(v)}
        if g:
            points.append(GapFidPoint(run_id, run_name, int(step), float(value), g))
    return points


def gap_fid_points(uri: str, experiment: str, parent_run_id: str | None = None) -> list[GapFidPoint]:
    """All (run, snapshot) points with FID in an MLflow experiment (children of `parent_run_id` if given).

    The gap at each FID step comes from the run's `per_sigma.json` history (loss_x0 - jstar) where the
    artifact has that step, else from the `gap/sigma_<s>` metric histories at that step.
    """
    from .tracking import find_runs, load_json_artifact, metric_history

    points = []
    for run in find_runs(uri, experiment, parent_run_id):
        if "fid" not in run.metrics:
            continue
        fid = metric_history(uri, run.run_id, "fid")
        hist = load_json_artifact(uri, run.run_id, "per_sigma.json")
        found = []
        if hist and hist.get("nimg"):
            jstar = np.asarray(hist["jstar"], dtype=np.float64)
            loss = np.array(hist["loss_x0"], dtype=np.float64)
            found = match_gap_fid(run.run_id, run.run_name, hist["sigmas"], hist["nimg"], loss - jstar, fid)
        matched = {p.nimg for p in found}
        missing = [(n, v) for n, v in fid if n not in matched]
        if missing:
            keys = sorted((k.removeprefix("gap/sigma_") for k in run.metrics if k.startswith("gap/sigma_")), key=float)
            by_key = {k: dict(metric_history(uri, run.run_id, f"gap/sigma_{k}")) for k in keys}
            steps = [n for n, _ in missing]
            gap = [[by_key[k].get(n, np.nan) for k in keys] for n in steps]
            found += match_gap_fid(run.run_id, run.run_name, [float(k) for k in keys], steps, gap, missing)
        points.extend(sorted(found, key=lambda p: p.nimg))
    return points


def gap_fid_correlation(points: list[GapFidPoint]) -> list[GapFidCorrelation]:
    """Pearson and Spearman correlation of gap_sigma with FID per sigma, over all points, by sigma.

    Fewer than 3 points, or no spread, at a sigma: NaN correlations (n says how many points there were).
    """
    import warnings

    from scipy.stats import pearsonr, spearmanr

    keys = sorted({k for p in points for k in p.gap}, key=float)
    out = []
    for k in keys:
        pairs = np.array([(p.gap[k], p.fid) for p in points if k in p.gap], dtype=np.float64).reshape(-1, 2)
        pearson = spearman = float("nan")
        if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # near-constant input: scipy warns and returns what it can
                pearson = float(pearsonr(pairs[:, 0], pairs[:, 1])[0])
                spearman = float(spearmanr(pairs[:, 0], pairs[:, 1])[0])
        out.append(GapFidCorrelation(float(k), pearson, spearman, len(pairs)))
    return out
