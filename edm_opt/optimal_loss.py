"""The optimal loss J*_sigma of a training set and its estimators (method.md sections 2-3).

Xu et al., "Diagnosing and Improving Diffusion Models by Estimating the Optimal Loss Value", Theorem 1:
for any predictor, E||f(x~) - x0||^2 >= J*_sigma = E_{x~} tr Cov[x0 | x~], and for a finite training set
the posterior over x0 given x~ = x0 + sigma eps is a softmax over the points with logits
-||x~ - x_n||^2 / (2 sigma^2). All values here are per dimension (totals divided by D), in the data's own
coordinates (edm-opt: [-1, 1] pixels), at VE noise levels sigma.

Implementation notes (method.md section 3, "Numerics"):
- Logits up to a per-query constant are (q.x_n - ||x_n||^2/2) / sigma^2, one float32 GEMM against the
  point matrix P = [x_n, -||x_n||^2/2, 1, lo]; the softmax-weighted sums [sum w x, -sum w ||x||^2/2, sum w]
  are a second GEMM against the same P. Sums are accumulated in float64 with a running row maximum; the
  extra column `lo` carries the float32 rounding of -||x||^2/2, so a one-hot posterior (sigma < sigma*)
  gives exactly 0. Elsewhere the float32 GEMMs limit absolute accuracy to about 1e-7 x the data variance.
- The data are centred first (the posterior is shift-invariant), which shrinks float32 rounding.
- Queries are drawn in fixed blocks of QUERY_BLOCK from a generator per (seed, sigma, class, block), so the
  result is deterministic for a seed and does not depend on how the work is chunked on the device.

J*_up (method.md section 4.2) bounds what a model that generalises can reach from above: min(J*_lin, J*_LOO),
the losses of the optimal linear denoiser and of the leave-one-out posterior mean. It is cached beside the
tables (`$EDM_OPT_CACHE/jstar_up/`) and attached to a table as `table.upper`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import EdmOptError, __version__
from .diffusion import EDM_DENSITY, LogNormal, edm_weight, reference_total, sigma_key, target_factor
from .fileio import write_json
from .latents import JSTAR_ON
from .progress import progress as progress_bar

ESTIMATORS = ("full", "dol", "cdol", "snis")
FORMAT_VERSION = 1
QUERY_BLOCK = 512  # queries per random block, and per shared subset of the subset estimators
SIGMA_STAR_FRACTION = 1e-3  # sigma* = largest grid sigma with J* < 1e-3 J*_max (method.md section 4)


class JStarMismatch(EdmOptError, ValueError):
    """A J* table that does not belong to the data, labels or sigma grid it is used with."""


# --------------------------------------------------------------------------------------------------
# The table


@dataclass
class OptimalLossTable:
    """J*_sigma per dimension on a sigma grid, with standard errors and provenance (DESIGN.md format)."""

    sigmas: np.ndarray
    values: np.ndarray  # J*_sigma, per-dimension x0 MSE, float64
    stderr: np.ndarray  # standard error of each value
    meta: dict = field(default_factory=dict)
    upper: "UpperBound | None" = None  # J*_up on the same grid, when computed (method.md section 4.2)

    def __post_init__(self):
        self.sigmas = np.asarray(self.sigmas, dtype=np.float64)
        self.values = np.asarray(self.values, dtype=np.float64)
        self.stderr = np.asarray(self.stderr, dtype=np.float64)
        if self.upper is not None:
            self.upper.check_grid(self.sigmas, "the J* table's J*_up")

    # provenance -----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("dataset", {}).get("fingerprint")

    @property
    def class_conditional(self) -> bool:
        return bool(self.meta.get("class_conditional", False))

    @property
    def data_variance(self) -> float:
        """Per-dimension data variance, the limit of J* for sigma -> infinity (unconditional)."""
        return float(self.meta["data_variance"])

    def check_compatible(self, fingerprint: str | None = None, class_conditional: bool | None = None,
                         sigmas: np.ndarray | None = None, source: str = "J* table") -> None:
        """Raise JStarMismatch unless the table is for this data, conditioning and sigma grid."""
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise JStarMismatch(f"{source} was computed for dataset fingerprint {str(self.fingerprint)[:16]}..., "
                                f"not for this data ({fingerprint[:16]}...)")
        if class_conditional is not None and self.class_conditional != class_conditional:
            kind = "class-conditional" if self.class_conditional else "unconditional"
            want = "class-conditional" if class_conditional else "unconditional"
            raise JStarMismatch(f"{source} is {kind}, but the run is {want}")
        if sigmas is not None and (len(sigmas) != len(self.sigmas) or not np.allclose(sigmas, self.sigmas, rtol=1e-9)):
            raise JStarMismatch(f"{source} has sigma grid {_grid_str(self.sigmas)}, the run uses {_grid_str(sigmas)}")

    # derived quantities ---------------------------------------------------------------------------
    @property
    def sigma_star(self) -> float:
        """Largest grid sigma with J*_sigma < 1e-3 x J*_max: below it the data are memorised (method.md 4)."""
        below = np.nonzero(self.values < SIGMA_STAR_FRACTION * self.values[-1])[0]
        return float(self.sigmas[below[-1]]) if below.size else float(self.sigmas[0])

    def interpolate(self, sigma, floor: float | None = None) -> np.ndarray:
        """J* between grid points: linear in ln max(J*, floor) over ln sigma (method.md section 4).

        `floor` defaults to 1e-6 x the data variance per dimension.
        """
        floor = 1e-6 * self.data_variance if floor is None else floor
        lj = np.log(np.maximum(self.values, floor))
        return np.exp(np.interp(np.log(sigma), np.log(self.sigmas), lj))

    def as_target(self, target: str, sigma_data: float = 0.5) -> np.ndarray:
        """J* in another target's native units: k(sigma) x J* (eps, fm velocity, v, EDM's F / lambda weighting)."""
        return target_factor(target, self.sigmas, sigma_data) * self.values

    def total(self, density: LogNormal = EDM_DENSITY, weight=edm_weight) -> float:
        """Total optimal loss E_{p(sigma)}[w(sigma) J*_sigma] by quadrature over the grid's bins.

        `weight` maps sigma to the x0-loss weight; the defaults give DESIGN.md's reference total.
        """
        return float(np.sum(density.bin_mass(self.sigmas) * weight(self.sigmas) * self.values))

    def ref_total(self) -> float:
        """DESIGN.md's reference total of J* (`jstar/ref_total`)."""
        return reference_total(self.sigmas, self.values)

    # file format ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = {"format_version": FORMAT_VERSION, **self.meta, "sigmas": self.sigmas.tolist(),
             "jstar": self.values.tolist(), "stderr": self.stderr.tolist()}
        if self.upper is not None:
            d["upper"] = self.upper.to_json()
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically)."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None,
             class_conditional: bool | None = None, sigmas: np.ndarray | None = None) -> "OptimalLossTable":
        """Read a table; with `fingerprint` / `class_conditional` / `sigmas`, check it belongs to them."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            version = d.pop("format_version")
            upper = d.pop("upper", None)
            table = cls(d.pop("sigmas"), d.pop("jstar"), d.pop("stderr"), d,
                        None if upper is None else UpperBound.from_json(upper))
        except FileNotFoundError:
            raise JStarMismatch(f"J* table {path} not found") from None
        except JStarMismatch as e:
            raise JStarMismatch(f"{path}: {e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise JStarMismatch(f"{path}: not an edm-opt J* table ({type(e).__name__}: {e})") from None
        if version != FORMAT_VERSION:
            raise JStarMismatch(f"{path}: J* table format {version}, this edm-opt reads {FORMAT_VERSION}")
        table.check_values(str(path))
        table.check_compatible(fingerprint, class_conditional, sigmas, source=str(path))
        return table

    def check_values(self, source: str = "J* table") -> None:
        """Raise JStarMismatch unless the content is a J* table: as many finite values and standard errors as
        sigmas, stderr >= 0 and J* >= 0 up to its Monte-Carlo noise (the subset estimators' paired form can dip below
        0 where J* ~ 0: 5 standard errors, plus 1e-6 x the data variance for float round-off)."""
        k = self.sigmas.size
        if self.sigmas.ndim != 1 or k == 0 or self.values.shape != (k,) or self.stderr.shape != (k,):
            raise JStarMismatch(f"{source}: {self.values.size} J* values and {self.stderr.size} standard errors for "
                                f"{k} sigmas")
        if not (np.all(np.isfinite(self.sigmas)) and np.all(self.sigmas > 0) and np.all(np.diff(self.sigmas) > 0)):
            raise JStarMismatch(f"{source}: the sigmas must be positive, finite and increasing")
        for name, v in (("J*", self.values), ("stderr", self.stderr)):
            if not np.all(np.isfinite(v)):
                bad = self.sigmas[~np.isfinite(v)]
                raise JStarMismatch(f"{source}: {name} is not finite at sigma = {', '.join(sigma_key(x) for x in bad[:3])}")
        tol = 1e-6 * float(self.meta.get("data_variance") or 1.0)
        low = self.values < -tol - 5 * np.maximum(self.stderr, 0)
        if low.any() or (self.stderr < 0).any():
            where = self.sigmas[low | (self.stderr < 0)]
            raise JStarMismatch(f"{source}: negative J* or standard error at sigma = "
                                f"{', '.join(sigma_key(x) for x in where[:3])}")

    def format(self) -> str:
        """A printable table: sigma, J*, standard error, the ratio to the data variance, and J*_up's columns."""
        up = self.upper
        head = f"{'sigma':>9}  {'J*/dim':>12}  {'stderr':>10}  {'J*/var':>8}"
        if up is not None:
            head += f"  {'J*_lin':>10}  {'J*_LOO':>10}  {'stderr':>9}  {'J*_up':>10}"
        lines = [head]
        var = self.meta.get("data_variance")
        for i, (s, v, e) in enumerate(zip(self.sigmas, self.values, self.stderr)):
            ratio = f"{v / var:8.4f}" if var else " " * 8
            row = f"{sigma_key(s):>9}  {v:12.6g}  {e:10.3g}  {ratio}"
            if up is not None:
                row += f"  {up.lin[i]:10.4g}  {up.loo[i]:10.4g}  {up.loo_stderr[i]:9.2g}  {up.values[i]:10.4g}"
            lines.append(row)
        lines.append(f"sigma* = {sigma_key(self.sigma_star)}   reference total = {self.ref_total():.6g}")
        if up is not None:
            lines.append(f"J*_up = min(J*_lin, J*_LOO): {up.describe()}")
        return "\n".join(lines)


def _grid_str(s) -> str:
    return f"{sigma_key(s[0])}:{sigma_key(s[-1])}:{len(s)}"


# --------------------------------------------------------------------------------------------------
# Estimation


def estimate_optimal_loss(data: torch.Tensor, sigmas, estimator: str = "full", num_samples: int | None = None,
                          subset_size: int | None = None, correction: float | None = None,
                          labels: torch.Tensor | None = None, seed: int = 0, device=None,
                          progress: bool = False) -> OptimalLossTable:
    """Estimate J*_sigma (per dimension) of the training set `data` at each VE noise level in `sigmas`.

    data: float tensor [N, ...] in the model's coordinates (flattened to D dimensions).
    estimator (method.md section 3): each of M queries x~ = x_src + sigma eps has a uniformly drawn source.
      - "full": softmax over all N points; averages the per-query conditional variance
        sum_n w_n ||x_n||^2 - ||sum_n w_n x_n||^2 (non-negative, lowest variance). The reference.
      - "snis": softmax over a random subset of L points without the source.
      - "dol": the source plus L-1 random points; biased low (the source dominates).
      - "cdol": as DOL, with the source's kernel weight divided by C. C = 1 is DOL; C -> inf is SNIS on L-1
        points. The subset estimators average the paired form ||x_src||^2 - ||E_hat[x0|x~]||^2.
      Subsets are shared by the QUERY_BLOCK queries of a block (each adds its own source), which turns the
      work into two GEMMs per block. With subset_size >= N they are the full estimator, exactly.
    The bias/variance trade-off of C, measured on digits (N = 1797, D = 64, M = 2N, L = 256) by the tests:
      at sigma = 0.6..1 the means order DOL < cDOL(C = 4N/L = 28) < SNIS, the full value lying between DOL
      and SNIS; DOL's bias is strongly negative (about -40% at sigma = 1), cDOL's much smaller, and SNIS is
      biased high at these sigmas while its per-query spread is the largest. Raising C moves the bias from
      negative towards positive and raises the variance; the best C depends on sigma. With L = N/2, cDOL is
      within 10% of the full estimate for sigma >= 1.
    Defaults: M = min(2N, 100000) queries per sigma, L = min(N, 4096), C = 4N/L (the paper's choice for
      L << N). `labels`: class-conditional J* (the posterior runs over the source's class; each class gets
      M N_c / N queries, L capped at N_c, default C = 4 N_c / L_c).
    Returns an OptimalLossTable; `meta` holds the parameters, N, D, data variance and wall time (the
    caller adds the dataset spec and fingerprint, see `estimate_for_dataset`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or sigmas.size == 0 or np.any(sigmas <= 0):
        raise ValueError("sigmas must be a non-empty 1-D array of positive noise levels")
    x = data.reshape(data.shape[0], -1).float().cpu()
    n_total, dim = x.shape
    if n_total < 2:
        raise ValueError("the optimal loss needs at least two data points")
    device = torch.device(device or "cpu")
    num_samples = num_samples or min(2 * n_total, 100_000)
    subset_size = subset_size or min(n_total, 4096)
    if subset_size < 2 and estimator != "full":
        raise ValueError("subset_size must be at least 2")

    if labels is None:
        groups = [torch.arange(n_total)]
    else:
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if labels.shape[0] != n_total:
            raise ValueError(f"{labels.shape[0]} labels for {n_total} data points")
        groups = [torch.nonzero(labels == c).reshape(-1) for c in torch.unique(labels).tolist()]

    plans = []
    for idx in groups:
        n = idx.numel()
        m = max(1, round(num_samples * n / n_total))
        size = min(subset_size, n)
        corr = correction if correction is not None else 4 * n / size
        plans.append((idx, m, size, corr))
    total_blocks = len(sigmas) * sum(math.ceil(m / QUERY_BLOCK) for _, m, _, _ in plans)

    bar = progress_bar(total=total_blocks, desc=f"J* ({estimator})", unit="block", disable=not progress, leave=False)
    t0 = time.perf_counter()
    means, stderrs = np.zeros(len(sigmas)), np.zeros(len(sigmas))
    points = [_Points(x if idx.numel() == n_total else x[idx], device) for idx, *_ in plans]
    for k, sigma in enumerate(sigmas):
        mean_k, var_k = 0.0, 0.0
        for g, ((idx, m, size, corr), pts) in enumerate(zip(plans, points)):
            p = idx.numel() / n_total
            if idx.numel() == 1:  # one point: the posterior is that point, J* = 0
                bar.update(math.ceil(m / QUERY_BLOCK))
                continue
            est = "full" if (estimator == "full" or size >= idx.numel()) else estimator
            v = _per_query_values(pts, float(sigma), m, est, size, corr, (seed, k, g), bar) / dim
            mean_k += p * v.mean().item()
            var_k += p * p * (v.var(unbiased=True).item() if v.numel() > 1 else 0.0) / v.numel()
        means[k], stderrs[k] = mean_k, math.sqrt(var_k)
    bar.close()

    meta = {
        "estimator": estimator,
        "params": {"num_samples": num_samples, "subset_size": None if estimator == "full" else subset_size,
                   "correction": _correction_meta(estimator, correction, n_total, subset_size), "seed": seed},
        "class_conditional": labels is not None,
        "num_images": n_total,
        "dim": dim,
        "data_variance": _total_variance(points),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "device": str(device),
        "edm_opt_version": __version__,
    }
    return OptimalLossTable(sigmas, means, stderrs, meta)


def _correction_meta(estimator, correction, n, size):
    if estimator in ("full", "snis"):
        return None
    if estimator == "dol":
        return 1.0
    return correction if correction is not None else 4 * n / min(size, n)


class _Points:
    """One group of data points (all, or one class) prepared for the GEMMs.

    Built in one float32 copy plus float64 passes over row chunks held in cache: whole-matrix float64 copies
    cost more (page faults, memory traffic) than the estimator's GEMMs at small M.
    """

    ROWS = 1024  # rows per float64 chunk

    def __init__(self, x: torch.Tensor, device: torch.device):
        self.n, self.dim = n, d = x.shape
        mean_f = x.sum(0) / n  # float32; any centre works (the posterior is shift-invariant) if used consistently
        self.mean = mean_f.double()  # float64 [D]
        # P = [x - mean, -||x - mean||^2/2 (hi), 1, -||x - mean||^2/2 (lo)]: logits and softmax moments are
        # both GEMMs against P; hi + lo carries the float64 value to ~1e-14, so a one-hot posterior cancels exactly.
        p = torch.empty(n, d + 3)
        half_sq = torch.empty(n, dtype=torch.float64)
        dot = torch.empty(n, dtype=torch.float64)
        buf = torch.empty(min(self.ROWS, n), d, dtype=torch.float64)
        for j in range(0, n, self.ROWS):
            xc = torch.sub(x[j: j + self.ROWS], mean_f, out=p[j: j + self.ROWS, :d])
            xcd = buf[: xc.shape[0]].copy_(xc)  # exact: float32 -> float64
            half_sq[j: j + self.ROWS] = torch.einsum("nd,nd->n", xcd, xcd).mul_(-0.5)
            torch.mv(xcd, self.mean, out=dot[j: j + self.ROWS])
        hi = half_sq.float()
        p[:, d] = hi
        p[:, d + 1] = 1.0
        p[:, d + 2] = (half_sq - hi.double()).float()
        self.p, self.device = p.to(device), device
        # ||x_n||^2 in the data's coordinates (paired form), float64: ||xc||^2 + 2 xc.mean + ||mean||^2
        self.sq_orig = -2 * half_sq + 2 * dot + self.mean @ self.mean
        mean_c = p[:, :d].sum(0).double() / n  # E[x - mean], ~1e-8 (float32 rounding of the centre)
        self.variance = float((-2 * half_sq.mean() - mean_c @ mean_c) / d)  # per dimension, population
        self.centre = self.mean + mean_c  # the exact data mean, float64 (for the total variance over groups)


def _total_variance(points: list["_Points"]) -> float:
    """Per-dimension data variance from the groups' own: within plus between groups (law of total variance)."""
    n = sum(pt.n for pt in points)
    mu = sum(pt.n * pt.centre for pt in points) / n
    return float(sum(pt.n * (pt.variance + (pt.centre - mu).square().sum().item() / pt.dim) for pt in points) / n)


def _block_rng(seed_key: tuple, block: int) -> torch.Generator:
    digest = hashlib.sha256(repr(seed_key + (block,)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def _per_query_values(pts: _Points, sigma: float, m: int, estimator: str, size: int, corr: float,
                      seed_key: tuple, bar) -> torch.Tensor:
    """Per-query values (totals over D, float64 on CPU) for M queries at one sigma; estimator "loo" is the
    full softmax without the query's source, valued by its direct error (J*_LOO)."""
    cuda = pts.device.type == "cuda"
    batch_blocks = 16 if cuda else 2  # query blocks per GEMM batch of the full estimator
    out, pending = [], []
    num_blocks = math.ceil(m / QUERY_BLOCK)
    for b in range(num_blocks):
        gen = _block_rng(seed_key, b)
        n_q = min(QUERY_BLOCK, m - b * QUERY_BLOCK)
        src = torch.randint(pts.n, (n_q,), generator=gen)
        eps = torch.randn(n_q, pts.dim, generator=gen)
        if estimator in ("full", "loo"):
            pending.append((src, eps))
            if len(pending) == batch_blocks or b == num_blocks - 1:
                src_all = torch.cat([s for s, _ in pending])
                eps_all = torch.cat([e for _, e in pending])
                out.append(_full_block(pts, sigma, src_all, eps_all, cuda, leave_out=estimator == "loo"))
                bar.update(len(pending))
                pending = []
        else:
            subset = torch.randperm(pts.n, generator=gen)[: size if estimator == "snis" else size - 1]
            out.append(_subset_block(pts, sigma, src, eps, subset, estimator, corr))
            bar.update(1)
    return torch.cat(out)


def _queries(pts: _Points, sigma: float, src: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """lhs = [x~ / sigma^2, 1 / sigma^2, 0, 0] with x~ = x_src + sigma eps (centred coordinates), float32."""
    inv = 1.0 / sigma ** 2
    q = pts.p[src.to(pts.device), : pts.dim] + sigma * eps.to(pts.device)
    lhs = torch.zeros(q.shape[0], pts.p.shape[1], device=pts.device)
    torch.mul(q, inv, out=lhs[:, : pts.dim])
    lhs[:, pts.dim] = inv
    return lhs


def _exp_clamped_(g: torch.Tensor) -> torch.Tensor:
    """exp in place of logits shifted to max 0, clamped at -60.

    Subnormal floats (exp below -87, and the products of weights near e^-87 in the GEMMs that follow) take a slow
    path on x86 CPUs: a cDOL block of Fashion-MNIST took 5.0 s with the clamp at -87 and 0.085 s at -60 on a
    Xeon (flushing subnormals to zero is per thread and misses the GEMM's threads; exp(-inf) is slow too).
    Clamped weights sum to < N e^-60 ~ 1e-21 of the largest, far below float32 resolution.
    """
    return g.clamp_min_(-60.0).exp_()


def _full_block(pts: _Points, sigma: float, src, eps, cuda: bool, leave_out: bool = False) -> torch.Tensor:
    """Per-query posterior variance tr Cov[x0 | x~] over all N points (streamed, running max).

    leave_out: per-query values of J*_LOO, the loss of the leave-one-out posterior mean E_{-n} (the posterior over
    the points other than the query's source n, method.md 4.2). Its direct error ||E_{-n} - x_n||^2 is taken as
    (||E_{-n} - x_n||^2 - ||E - x_n||^2) + tr Cov[x0 | x~], the full posterior's direct error replaced by its
    conditional mean: the same expectation, and a variance that vanishes at large sigma, where E_{-n} ~ E.
    """
    lhs = _queries(pts, sigma, src, eps)
    chunk = 32768 if cuda else 4096
    row_max = torch.full((lhs.shape[0],), -math.inf, device=pts.device)
    acc = torch.zeros(lhs.shape[0], pts.p.shape[1], dtype=torch.float64, device=pts.device)
    src_d = src.to(pts.device)
    rows = torch.arange(lhs.shape[0], device=pts.device)
    for j in range(0, pts.n, chunk):
        p = pts.p[j: j + chunk]
        g = lhs @ p.T  # logits up to a per-query constant: (q.x - ||x||^2/2) / sigma^2
        if leave_out:
            own = (src_d >= j) & (src_d < j + p.shape[0])
            g[rows[own], src_d[own] - j] = -math.inf
        new_max = torch.maximum(row_max, g.amax(1))
        w = _exp_clamped_(g.sub_(new_max[:, None]))
        if leave_out:
            w[rows[own], src_d[own] - j] = 0.0  # the clamp turned -inf into e^-60; the source is out
        acc.mul_(torch.exp(row_max - new_max).double()[:, None]).add_((w @ p).double())
        row_max = new_max
    if not leave_out:
        return _posterior_variance(acc, pts.dim).clamp_min(0).cpu()
    # the full posterior = the leave-one-out sums plus the source's own term, its logit in float64
    p_src = pts.p[src_d].double()
    g_src = (lhs.double() * p_src).sum(1)
    top = torch.maximum(row_max.double(), g_src)
    full = acc * torch.exp(row_max.double() - top)[:, None] + torch.exp(g_src - top)[:, None] * p_src
    x_src = p_src[:, : pts.dim]
    loo_err = (acc[:, : pts.dim] / acc[:, pts.dim + 1: pts.dim + 2] - x_src).square().sum(1)
    full_err = (full[:, : pts.dim] / full[:, pts.dim + 1: pts.dim + 2] - x_src).square().sum(1)
    return (loo_err - full_err + _posterior_variance(full, pts.dim).clamp_min(0)).cpu()


def _posterior_variance(acc: torch.Tensor, dim: int) -> torch.Tensor:
    """tr Cov[x0 | x~] per query from the softmax-weighted sums [sum w x, -sum w ||x||^2/2 (hi), sum w, (lo)]."""
    s0 = acc[:, dim + 1]
    mean = acc[:, :dim] / s0[:, None]
    second = -2 * (acc[:, dim] + acc[:, dim + 2]) / s0  # sum_n w_n ||x_n||^2 (centred), hi + lo
    return second - (mean * mean).sum(1)


def _subset_block(pts: _Points, sigma: float, src, eps, subset, estimator: str, corr: float) -> torch.Tensor:
    """Paired-form values ||x_src||^2 - ||E_hat||^2 for one block sharing the random subset."""
    dev = pts.device
    lhs = _queries(pts, sigma, src, eps)
    src_d, subset_d = src.to(dev), subset.to(dev)
    p_r = pts.p[subset_d]
    g = lhs @ p_r.T
    g.masked_fill_(subset_d[None, :] == src_d[:, None], -math.inf)  # the source enters only as itself
    row_max = g.amax(1).double()
    if estimator in ("dol", "cdol"):
        # the source's logit, exactly: (x~.x_src - ||x_src||^2/2) / sigma^2, minus ln C (cDOL)
        p_src = pts.p[src_d].double()
        g_src = (lhs.double() * p_src).sum(1) - math.log(corr if estimator == "cdol" else 1.0)
        row_max = torch.maximum(row_max, g_src)
    w = _exp_clamped_(g - row_max[:, None].float())
    acc = (w @ p_r).double()
    if estimator in ("dol", "cdol"):
        acc += torch.exp(g_src - row_max)[:, None] * p_src
    e_hat = acc[:, : pts.dim] / acc[:, pts.dim + 1:pts.dim + 2] + pts.mean.to(dev)  # back to the data's coordinates
    return (pts.sq_orig.to(dev)[src_d] - (e_hat * e_hat).sum(1)).cpu()


# --------------------------------------------------------------------------------------------------
# J*_up: upper bounds of the reachable optimum (method.md section 4.2)


@dataclass
class UpperBound:
    """J*_up = min(J*_lin, J*_LOO) per dimension on a sigma grid (method.md section 4.2).

    lin: loss of the optimal linear denoiser, (1/D) sum_i l_i sigma^2 / (l_i + sigma^2) over the eigenvalues l_i of
    the training data's covariance (per class, shrunk towards the pooled within-class covariance, for
    class-conditional data); loo: direct error of the leave-one-out posterior mean, with its standard error.
    Both are losses of fixed denoisers, so J*_train <= J*_pop <= J*_up (up to Monte-Carlo noise in loo).
    """

    sigmas: np.ndarray
    lin: np.ndarray
    loo: np.ndarray
    loo_stderr: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("sigmas", "lin", "loo", "loo_stderr"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if not (self.sigmas.shape == self.lin.shape == self.loo.shape == self.loo_stderr.shape):
            raise JStarMismatch(f"J*_up has {self.sigmas.size} sigmas but {self.lin.size} J*_lin and "
                                f"{self.loo.size} J*_LOO values")
        if not (np.all(np.isfinite(self.lin)) and np.all(np.isfinite(self.loo))) or self.values.min() < 0:
            raise JStarMismatch("J*_up holds negative or non-finite values")

    @property
    def values(self) -> np.ndarray:
        """J*_up = min(J*_lin, J*_LOO)."""
        return np.minimum(self.lin, self.loo)

    def check_grid(self, sigmas: np.ndarray, source: str = "J*_up") -> None:
        if len(sigmas) != len(self.sigmas) or not np.allclose(sigmas, self.sigmas, rtol=1e-9):
            raise JStarMismatch(f"{source} has sigma grid {_grid_str(self.sigmas)}, not {_grid_str(sigmas)}")

    def describe(self) -> str:
        p = self.meta.get("params", {})
        t = self.meta.get("wall_time_s", {})
        return (f"J*_LOO from {p.get('num_samples')} queries per sigma (seed {p.get('seed')}), "
                f"J*_lin from {self.meta.get('covariance', 'the covariance')}; "
                f"{t.get('lin', 0):.1f} s + {t.get('loo', 0):.1f} s")

    def to_json(self) -> dict:
        return {**self.meta, "sigmas": self.sigmas.tolist(), "lin": self.lin.tolist(), "loo": self.loo.tolist(),
                "loo_stderr": self.loo_stderr.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "UpperBound":
        d = dict(d)
        return cls(d.pop("sigmas"), d.pop("lin"), d.pop("loo"), d.pop("loo_stderr"), d)


LOO_SAMPLES = 2048  # default queries per sigma of J*_LOO: ~2% standard error, a few minutes for 60k images


def linear_optimal_loss(data: torch.Tensor, sigmas, labels: torch.Tensor | None = None) -> np.ndarray:
    """J*_lin(sigma) per dimension: the training loss of the optimal linear (affine) denoiser.

    With covariance eigenvalues l_i (divisor N), J*_lin = (1/D) sum_i l_i sigma^2 / (l_i + sigma^2) (method.md 4.2;
    the Gaussian closed form of section 2 with the data's own covariance). `labels`: per class c, the covariance
    S_c shrunk towards the pooled within-class covariance S_w as (N_c S_c + D S_w) / (N_c + D) (edm-opt choice: D
    pseudo-images of prior; a class with fewer images than dimensions is otherwise rank-deficient and would
    claim zero loss in the missing directions), and J*_lin = sum_c (N_c / N) J*_lin(S_c).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    x = data.reshape(data.shape[0], -1).double().cpu()
    n, dim = x.shape
    groups = [torch.arange(n)] if labels is None else [
        torch.nonzero(torch.as_tensor(labels).reshape(-1) == c).reshape(-1)
        for c in torch.unique(torch.as_tensor(labels)).tolist()]
    covs, sizes = [], []
    for idx in groups:
        xc = x[idx] - x[idx].mean(0)
        covs.append(xc.T @ xc / idx.numel())
        sizes.append(idx.numel())
    if labels is not None:
        pooled = sum(c * k for c, k in zip(covs, sizes)) / n
        covs = [(k * c + dim * pooled) / (k + dim) for c, k in zip(covs, sizes)]
    s2 = sigmas[:, None] ** 2
    out = np.zeros(len(sigmas))
    for cov, k in zip(covs, sizes):
        lam = np.clip(torch.linalg.eigvalsh(cov).numpy(), 0, None)
        out += k / n * (lam[None, :] * s2 / (lam[None, :] + s2)).sum(1) / dim
    return out


def estimate_upper_bound(data: torch.Tensor, sigmas, labels: torch.Tensor | None = None,
                         num_samples: int = LOO_SAMPLES, seed: int = 0, device=None,
                         progress: bool = False) -> UpperBound:
    """J*_lin and J*_LOO (per dimension) of the training set `data` at each VE noise level (method.md 4.2).

    J*_LOO: M queries x~ = x_n + sigma eps with a uniform source n; the posterior mean over the other points
    (of the source's class with `labels`) is the full estimator's softmax with the source masked out, and each
    query's value is its direct error ||E_{-n}[x0|x~] - x_n||^2 / D (not the paired form: the leave-one-out
    denoiser is a fixed function, its loss is what bounds the population optimum), with the full posterior's
    part of it Rao-Blackwellised (`_full_block`), so J*_LOO >= J*_train holds to a small standard error.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    x = data.reshape(data.shape[0], -1).float().cpu()
    n_total, dim = x.shape
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    lin = linear_optimal_loss(data, sigmas, labels)
    t_lin = time.perf_counter() - t0
    if labels is None:
        groups = [torch.arange(n_total)]
    else:
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        groups = [torch.nonzero(labels == c).reshape(-1) for c in torch.unique(labels).tolist()]
    if min(idx.numel() for idx in groups) < 2:
        raise ValueError("J*_LOO needs at least two images in every class")
    plans = [(idx, max(1, round(num_samples * idx.numel() / n_total))) for idx in groups]
    bar = progress_bar(total=len(sigmas) * sum(math.ceil(m / QUERY_BLOCK) for _, m in plans), desc="J*_up (LOO)",
               unit="block", disable=not progress, leave=False)
    t1 = time.perf_counter()
    points = [_Points(x if idx.numel() == n_total else x[idx], device) for idx, _ in plans]
    loo, loo_se = np.zeros(len(sigmas)), np.zeros(len(sigmas))
    for k, sigma in enumerate(sigmas):
        for g, ((idx, m), pts) in enumerate(zip(plans, points)):
            p = idx.numel() / n_total
            v = _per_query_values(pts, float(sigma), m, "loo", 0, 0.0, ("loo", seed, k, g), bar) / dim
            loo[k] += p * v.mean().item()
            loo_se[k] += p * p * (v.var(unbiased=True).item() if v.numel() > 1 else 0.0) / v.numel()
    bar.close()
    meta = {"params": {"num_samples": num_samples, "seed": seed}, "class_conditional": labels is not None,
            "covariance": "per-class covariances shrunk towards the pooled one (D pseudo-images)"
            if labels is not None else "the data covariance",
            "wall_time_s": {"lin": round(t_lin, 3), "loo": round(time.perf_counter() - t1, 3)},
            "device": str(device), "edm_opt_version": __version__}
    return UpperBound(sigmas, lin, loo, np.sqrt(loo_se), meta)


# --------------------------------------------------------------------------------------------------
# Datasets, the cache, and resolution of `--jstar PATH|auto`


def cache_dir() -> Path:
    """`$EDM_OPT_CACHE` (default `~/.cache/edm-opt`)."""
    return Path(os.environ.get("EDM_OPT_CACHE") or Path.home() / ".cache" / "edm-opt")


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def table_dataset(dataset) -> dict:
    """What a J* (or J*_up) table records of its data; for latents, that J* is of their scaled means."""
    d = {**dataset.spec.to_dict(), "fingerprint": dataset.fingerprint, "preprocessing": dataset.preprocessing}
    if dataset.latent is not None:
        d["jstar_on"] = JSTAR_ON
    return d


def jstar_cache_path(dataset, sigmas, estimator: str = "cdol", class_conditional: bool = False,
                     num_samples: int | None = None, subset_size: int | None = None,
                     correction: float | None = None, seed: int = 0) -> Path:
    """`$EDM_OPT_CACHE/jstar/<fingerprint>-<hash of every parameter that changes the numbers>.json`."""
    params = {"estimator": estimator, "sigmas": [float(s) for s in np.asarray(sigmas, dtype=np.float64)],
              "num_samples": num_samples, "subset_size": subset_size, "correction": correction, "seed": seed,
              "class_conditional": class_conditional, "format": FORMAT_VERSION}
    return cache_dir() / "jstar" / f"{dataset.fingerprint}-{_params_hash(params)}.json"


def upper_cache_path(dataset, sigmas, class_conditional: bool = False, num_samples: int = LOO_SAMPLES,
                     seed: int = 0) -> Path:
    """`$EDM_OPT_CACHE/jstar_up/<fingerprint>-<hash of every parameter that changes the numbers>.json`."""
    params = {"sigmas": [float(s) for s in np.asarray(sigmas, dtype=np.float64)], "num_samples": num_samples,
              "seed": seed, "class_conditional": class_conditional, "format": FORMAT_VERSION}
    return cache_dir() / "jstar_up" / f"{dataset.fingerprint}-{_params_hash(params)}.json"


def _load_upper(path: Path, fingerprint: str, sigmas) -> UpperBound | None:
    try:
        d = json.loads(path.read_text())
        if d.get("dataset", {}).get("fingerprint") != fingerprint:
            return None
        upper = UpperBound.from_json(d)
        upper.check_grid(sigmas)
        return upper
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a stale or damaged cache entry is recomputed


def upper_bound_for_dataset(dataset, sigmas, class_conditional: bool = False, num_samples: int = LOO_SAMPLES,
                            seed: int = 0, device=None, progress: bool = False, use_cache: bool = True,
                            wait: bool = False, timeout_s: float = 6 * 3600) -> UpperBound:
    """J*_up of an `ImageDataset` (data in [-1, 1]), stored in / reused from `$EDM_OPT_CACHE/jstar_up/`.

    `wait` (ranks other than 0 before the process group exists): wait for rank 0 to write the cache entry.
    """
    if class_conditional and dataset.labels is None:
        raise JStarMismatch(f"{dataset.spec.source}: class-conditional J*_up needs labels, and this dataset has none")
    sigmas = np.asarray(sigmas, dtype=np.float64)
    path = upper_cache_path(dataset, sigmas, class_conditional, num_samples, seed)
    deadline = time.monotonic() + timeout_s
    while wait and not path.exists():
        if time.monotonic() > deadline:
            raise JStarMismatch(f"timed out waiting for rank 0 to write {path}")
        time.sleep(1.0)
    if (use_cache or wait) and path.exists():
        upper = _load_upper(path, dataset.fingerprint, sigmas)
        if upper is not None:
            return upper
        if wait:
            raise JStarMismatch(f"{path}: rank 0 wrote a J*_up entry that does not belong to this data")
    upper = estimate_upper_bound(dataset.to_float(), sigmas, dataset.labels if class_conditional else None,
                                 num_samples, seed, device, progress)
    upper.meta["dataset"] = table_dataset(dataset)
    if use_cache:
        write_json(path, upper.to_json())
    return upper


def estimate_for_dataset(dataset, sigmas, estimator: str = "cdol", class_conditional: bool = False,
                         num_samples: int | None = None, subset_size: int | None = None,
                         correction: float | None = None, seed: int = 0, device=None, progress: bool = False,
                         use_cache: bool = True, upper: bool = False,
                         data: torch.Tensor | None = None) -> tuple[OptimalLossTable, Path | None]:
    """J* of an `ImageDataset` (data in [-1, 1]), stored in / reused from `$EDM_OPT_CACHE/jstar/`.

    `upper`: also attach J*_up (`upper_bound_for_dataset`, its own cache entry) as `table.upper`.
    `data`: `dataset.to_float()`, when the caller already holds it (a study of many estimates converts once).
    """
    if class_conditional and dataset.labels is None:
        raise JStarMismatch(f"{dataset.spec.source}: class-conditional J* needs labels, and this dataset has none")
    sigmas = np.asarray(sigmas, dtype=np.float64)
    path = jstar_cache_path(dataset, sigmas, estimator, class_conditional, num_samples, subset_size, correction,
                            seed)
    table = None
    if use_cache and path.exists():
        try:
            table = OptimalLossTable.load(path, dataset.fingerprint, class_conditional, sigmas)
        except JStarMismatch:
            pass  # a stale or damaged cache entry is recomputed below
    if table is None:
        x = dataset.to_float() if data is None else data
        table = estimate_optimal_loss(x, sigmas, estimator, num_samples, subset_size, correction,
                                      dataset.labels if class_conditional else None, seed, device, progress)
        table.meta["dataset"] = table_dataset(dataset)
        if use_cache:
            table.save(path)
    if upper:
        table.upper = upper_bound_for_dataset(dataset, sigmas, class_conditional, device=device, progress=progress,
                                              use_cache=use_cache)
    return table, path if use_cache else None


def resolve_jstar(spec: str, dataset, sigmas, class_conditional: bool, device=None, progress: bool = True,
                  wait: bool = False, timeout_s: float = 6 * 3600, upper: bool = False,
                  echo=print) -> tuple[OptimalLossTable, Path]:
    """`--jstar PATH|auto`: load and check a table, or estimate with cDOL defaults into the cache.

    `wait` (ranks other than 0 before the process group exists): wait for rank 0 to write the cached table.
    `upper` (the schedules that need J*_up): a table without it gets J*_up from its own cache, computed there
    by rank 0 if missing (`echo` says so, naming the table); a table that holds J*_up keeps its own.
    """
    if spec and spec != "auto":
        table, path = OptimalLossTable.load(spec, dataset.fingerprint, class_conditional, sigmas), Path(spec)
    elif wait:
        path = jstar_cache_path(dataset, sigmas, "cdol", class_conditional)
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise JStarMismatch(f"timed out waiting for rank 0 to write {path}")
            time.sleep(1.0)
        table = OptimalLossTable.load(path, dataset.fingerprint, class_conditional, sigmas)
    else:
        table, path = estimate_for_dataset(dataset, sigmas, "cdol", class_conditional, device=device,
                                           progress=progress)
    if upper and table.upper is None:
        cached = upper_cache_path(dataset, sigmas, class_conditional)
        if not wait and not cached.exists():
            echo(f"{path} has no J*_up; computing it from the data into {cached} (once per dataset)")
        table.upper = upper_bound_for_dataset(dataset, sigmas, class_conditional, device=device, progress=progress,
                                              wait=wait, timeout_s=timeout_s)
    return table, path
