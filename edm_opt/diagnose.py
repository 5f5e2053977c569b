"""Diagnose any model: per-sigma x0 loss and gap to J* on the fixed held-out set, memorisation, gap vs FID.

The held-out set is a fixed subset of the *training* images (J* is the floor on the training set):
`per_sigma` images per grid sigma with their noise, both drawn from a generator seeded by a constant,
so every run on a dataset, and every later diagnosis of its snapshots, sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import EdmOptError
from .diffusion import NativeDenoiser, reference_total, sigma_key

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
# Any model: load it, measure it against J*, look for memorisation (`edm-opt diagnose`).


class DiagnoseError(EdmOptError, ValueError):
    """A model or input that cannot be diagnosed; the message names the file or option."""


@dataclass
class LoadedModel:
    """A denoiser D(x; sigma, labels) in VE x0 coordinates and what is known about where it came from."""

    net: torch.nn.Module
    description: str
    nimg: int | None = None  # images seen, for edm-opt snapshots
    data: dict | None = None  # the data spec and fingerprint an edm-opt snapshot was trained on
    class_conditional: bool | None = None
    heldout_per_sigma: int | None = None
    jstar_path: str | None = None
    run_dir: str | None = None


def load_model(model: str, preset: str | None = None, network_kwargs: dict | None = None, target: str = "x0",
               precond: str = "edm", snapshot: str = "latest", img_shape: tuple | None = None) -> LoadedModel:
    """MODEL as edm-opt knows it: a run directory, a snapshot, an official-layout state dict, or module:factory.

    - run directory / `snapshot-*.pt`: the EMA network of an edm-opt run;
    - a state dict (`torch.save(net.state_dict())`) in the official EDM2 (`unet.*`, `logvar_*`) or EDM
      (`model.*`) layout, built from `preset` (+ `network_kwargs`), with resolution, channels and label_dim
      read from the weights' shapes, loaded with strict=True;
    - `package.module:factory`: `factory()` returns a torch module mapping (c_in x, sigma, labels) to its
      native `target` under `precond` (see `edm_opt.diffusion.NativeDenoiser`).
    """
    from .evaluation import load_snapshot_network
    from .rundir import RunDir

    path = Path(model).expanduser()
    if path.is_dir():
        run = RunDir(path)
        info = run.read_info()
        nimg, snap_path = run.snapshot_path(snapshot)
        snap = load_snapshot_network(snap_path)
        cfg = info.get("config", {})
        return LoadedModel(snap.net, f"{run.path.name} @ {nimg:,} images", nimg, info.get("data"),
                           snap.meta.get("class_conditional"), cfg.get("heldout_per_sigma"),
                           info.get("jstar", {}).get("path"), str(run.path))
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DiagnoseError(f"{path}: not a torch state dict or edm-opt snapshot ({type(e).__name__}: {e}); "
                                f"official .pkl files: export `net.state_dict()` with torch.save first") from None
        if isinstance(obj, dict) and "network" in obj and "net" in obj:
            snap = load_snapshot_network(path)
            return LoadedModel(snap.net, f"{path.name} @ {snap.nimg:,} images", snap.nimg, snap.meta.get("data"),
                               snap.meta.get("class_conditional"))
        return LoadedModel(_net_from_state_dict(obj, path, preset, network_kwargs), f"{path.name} ({preset})")
    if ":" in model:
        import importlib

        mod_name, _, factory = model.partition(":")
        try:
            module = getattr(importlib.import_module(mod_name), factory)()
        except (ImportError, AttributeError) as e:
            raise DiagnoseError(f"cannot load {model!r}: {e}") from None
        net = NativeDenoiser(module, target, precond).eval()
        if img_shape is not None:
            for attr, v in zip(("img_channels", "img_resolution"), img_shape):
                if not hasattr(net, attr):
                    setattr(net, attr, v)
        if not hasattr(net, "label_dim"):
            net.label_dim = 0
        return LoadedModel(net, f"{model} ({target} target, {precond} preconditioning)")
    raise DiagnoseError(f"model {model!r} not found: give a run directory, a snapshot or state-dict file, "
                        f"or module:factory")


def _net_from_state_dict(state: dict, path: Path, preset: str | None, network_kwargs: dict | None):
    from .networks import build_network, get_preset

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiagnoseError(f"{path}: expected a state dict of tensors")
    if preset is None:
        raise DiagnoseError(f"{path}: a state dict needs --preset (and --network-kwargs for non-preset settings) "
                            f"to build the network")
    try:
        arch = get_preset(preset).arch
    except ValueError as e:
        raise DiagnoseError(f"--preset: {e}") from None
    kw = dict(network_kwargs or {})
    if arch == "edm2":
        first = next((k for k in state if k.startswith("unet.enc.") and k.endswith("_conv.weight")), None)
        if first is None:
            raise DiagnoseError(f"{path}: no `unet.enc.*_conv.weight`: not the official EDM2 layout that preset "
                                f"{preset!r} needs")
        kw.setdefault("img_resolution", int(first.split(".")[2].split("x")[0]))
        kw.setdefault("img_channels", int(state[first].shape[1]) - 1)  # the ones channel
        kw.setdefault("label_dim", int(state["unet.emb_label.weight"].shape[1]) if "unet.emb_label.weight" in state else 0)
    else:
        first = next((k for k in state if k.startswith("model.enc.") and k.endswith("_conv.weight")), None)
        if first is None:
            raise DiagnoseError(f"{path}: no `model.enc.*_conv.weight`: not the official EDM (DDPM++) layout that "
                                f"preset {preset!r} needs")
        kw.setdefault("img_resolution", int(first.split(".")[2].split("x")[0]))
        kw.setdefault("img_channels", int(state[first].shape[1]))
        kw.setdefault("label_dim", int(state["model.map_label.weight"].shape[1]) if "model.map_label.weight" in state else 0)
        if "model.map_augment.weight" in state:
            kw.setdefault("augment_dim", int(state["model.map_augment.weight"].shape[1]))
    data = {k: kw.pop(k) for k in ("img_resolution", "img_channels", "label_dim")}
    try:
        net = build_network(preset, **data, **kw)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise DiagnoseError(f"{path} does not fit preset {preset!r}: {str(e).splitlines()[0][:500]}") from None
    return net.eval()


def nearest_neighbour_distances(samples: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distances [S, 2] of each sample to its nearest and second-nearest training image.

    Both in the same units (e.g. [-1, 1] pixels), flattened; squared distances by GEMM in float64 chunks.
    """
    s = samples.reshape(len(samples), -1).double()
    t = train.reshape(len(train), -1).double()
    s2, best = (s * s).sum(1, keepdim=True), torch.full((len(s), 2), math.inf, dtype=torch.float64)
    for j in range(0, len(t), chunk):
        tj = t[j:j + chunk]
        d = (s2 - 2 * s @ tj.T + (tj * tj).sum(1)[None]).clamp_min(0)
        best = torch.cat([best, d], 1).topk(2, dim=1, largest=False).values
    return best.sqrt()


def memorisation(samples_uint8: torch.Tensor, dataset, threshold: float = 1 / 3) -> dict:
    """Nearest/second-nearest distance ratio of generated samples to the training set (a ratio near 0: a copy).

    Returns per-sample distances and ratios, and the share of samples under `threshold`.
    """
    samples = samples_uint8.float() / 127.5 - 1
    d = nearest_neighbour_distances(samples, dataset.to_float())
    ratio = d[:, 0] / d[:, 1].clamp_min(1e-12)
    return {"threshold": threshold, "copy_share": float((ratio < threshold).double().mean()),
            "ratio_median": float(ratio.median()), "nn_distance_median": float(d[:, 0].median()),
            "ratio": ratio.tolist(), "nn_distance": d[:, 0].tolist()}


def diagnose(loaded: LoadedModel, dataset, jstar, per_sigma: int = 64, class_conditional: bool = False,
             device="cpu", test_dataset=None, samples: int = 0, steps: int = 32, threshold: float = 1 / 3,
             progress: bool = False) -> dict:
    """Held-out per-sigma x0 loss of a model against J* (DESIGN.md held-out set), plus memorisation checks.

    The held-out set is the one every training run on this dataset uses, so a run's snapshot reproduces the
    run's own logged losses. Returns plain data (what `diagnose.json` holds).
    """
    sigmas = jstar.sigmas
    net = loaded.net.to(device).eval()
    heldout = HeldOutSet.build(dataset, sigmas, per_sigma, class_conditional)
    loss, stderr = heldout_losses(net, heldout, device)
    gap = loss - jstar.values
    s_max, g_max = largest_gap(sigmas, gap)
    ref, jref = reference_total(sigmas, loss), reference_total(sigmas, jstar.values)
    out = {"model": loaded.description, "data": {"source": dataset.spec.source, "fingerprint": dataset.fingerprint},
           "sigmas": sigmas.tolist(), "loss_x0": loss.tolist(), "stderr": stderr.tolist(),
           "jstar": jstar.values.tolist(), "gap": gap.tolist(), "sigma_star": jstar.sigma_star,
           "ref_total": {"loss": ref, "jstar": jref, "gap": ref - jref},
           "largest_gap": {"sigma": s_max, "gap": g_max}, "per_sigma": per_sigma,
           "negative_gaps": negative_gaps(sigmas, loss, stderr, jstar.values)}
    if test_dataset is not None:
        held_test = HeldOutSet.build(test_dataset, sigmas, per_sigma, class_conditional)
        t_loss, t_se = heldout_losses(net, held_test, device)
        out.update({"test_loss_x0": t_loss.tolist(), "test_stderr": t_se.tolist(),
                    "test_data": test_dataset.spec.source})
    if samples:
        from .sampling import generate

        images, _ = generate(net, range(samples), batch_size=64, num_steps=steps, device=device, progress=progress)
        out["memorisation"] = memorisation(images, dataset, threshold)
    return out


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


# --------------------------------------------------------------------------------------------------
# The command: inputs resolved, outputs written and logged.


def run_diagnosis(model: str, data: str | None, out: Path, jstar: str = "auto", sigmas: str | None = None,
                  per_sigma: int | None = None, target: str = "x0", precond: str = "edm", preset: str | None = None,
                  network_kwargs: dict | None = None, snapshot: str = "latest", resolution: int | None = None,
                  class_conditional: bool | None = None, test_data: str | None = None, samples: int = 0,
                  steps: int = 32, threshold: float = 1 / 3, run_id: str | None = None, device: str = "cpu",
                  echo=print) -> dict:
    """`edm-opt diagnose MODEL`: measure, print a table, write DIR/diagnose.json and DIR/diagnose.png, log."""
    from .data import DataSpec, load_dataset
    from .diffusion import parse_sigmas
    from .fileio import write_json
    from .optimal_loss import OptimalLossTable, resolve_jstar
    from .plots import plot_diagnosis

    loaded = load_model(model, preset, network_kwargs, target, precond, snapshot)
    if data is None:
        if loaded.data is None:
            raise DiagnoseError("--data is needed (the model does not say what it was trained on)")
        dataset = DataSpec.from_dict(loaded.data).load()
        if dataset.fingerprint != loaded.data.get("fingerprint", dataset.fingerprint):
            raise DiagnoseError(f"{loaded.data['source']} has changed since {loaded.description} was trained on it")
    else:
        dataset = load_dataset(data, resolution if resolution is not None else (loaded.data or {}).get("resolution"))
    if class_conditional is None:
        class_conditional = bool(loaded.class_conditional) or getattr(loaded.net, "label_dim", 0) > 0
    if class_conditional and dataset.labels is None:
        raise DiagnoseError(f"{dataset.spec.source} has no labels, but the model is class-conditional")
    for attr, v in (("img_channels", dataset.channels), ("img_resolution", dataset.resolution)):
        if not hasattr(loaded.net, attr):
            setattr(loaded.net, attr, v)
    if jstar == "auto" and loaded.jstar_path and Path(loaded.jstar_path).exists() and sigmas is None:
        table = OptimalLossTable.load(loaded.jstar_path, dataset.fingerprint, class_conditional)
    else:
        grid = parse_sigmas(sigmas) if sigmas else None
        if grid is None and jstar != "auto":
            grid = OptimalLossTable.load(jstar).sigmas
        from .diffusion import sigma_grid

        table, _ = resolve_jstar(jstar, dataset, sigma_grid() if grid is None else grid, class_conditional,
                                 device=device)
    test = None
    if test_data:
        test = load_dataset(test_data, dataset.spec.resolution)
    elif dataset.spec.split == "train" and Path(dataset.spec.source).is_dir():
        try:  # IDX directories have a t10k split
            test = load_dataset(dataset.spec.source, dataset.spec.resolution, split="test")
        except EdmOptError:
            test = None
    per_sigma = per_sigma or loaded.heldout_per_sigma or 64
    result = diagnose(loaded, dataset, table, per_sigma, class_conditional, device, test, samples, steps, threshold,
                      progress=True)
    echo(format_diagnosis(result))
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / "diagnose.json", result)
    png = plot_diagnosis(result, out / "diagnose.png")
    echo(f"wrote {json_path} and {png}")
    result["logged_to"] = _log_diagnosis(result, loaded, json_path, png, run_id)
    return result


def format_diagnosis(r: dict) -> str:
    test = "test_loss_x0" in r
    head = f"{'sigma':>8} {'loss_x0':>11} {'+-':>8} {'J*':>11} {'gap':>11}" + (f" {'test loss':>11}" if test else "")
    lines = [f"{r['model']} on {r['data']['source']} ({r['per_sigma']} held-out images per sigma)", head]
    for i, s in enumerate(r["sigmas"]):
        row = f"{sigma_key(s):>8} {r['loss_x0'][i]:11.4g} {r['stderr'][i]:8.2g} {r['jstar'][i]:11.4g} {r['gap'][i]:11.4g}"
        lines.append(row + (f" {r['test_loss_x0'][i]:11.4g}" if test else ""))
    ref = r["ref_total"]
    lines.append(f"reference total: loss {ref['loss']:.5g}, J* {ref['jstar']:.5g}, gap {ref['gap']:.5g}; "
                 f"sigma* = {r['sigma_star']:.3g}; largest gap {r['largest_gap']['gap']:.4g} at sigma = "
                 f"{r['largest_gap']['sigma']:.4g}")
    for warning in r["negative_gaps"]:
        lines.append(f"WARNING: loss below J* by more than 3 standard errors at {warning}")
    if "memorisation" in r:
        m = r["memorisation"]
        lines.append(f"memorisation: {100 * m['copy_share']:.1f}% of {len(m['ratio'])} samples have a nearest/second-"
                     f"nearest training-distance ratio below {m['threshold']:.3g} (median ratio {m['ratio_median']:.3f})")
    return "\n".join(lines)


def _log_diagnosis(r: dict, loaded: LoadedModel, json_path: Path, png: Path, run_id: str | None) -> str | None:
    """A new run in experiment `diagnose`, or (with run_id) `diagnose/*` keys in an existing run."""
    from .tracking import create_run, default_tracking_uri, log_now

    uri = default_tracking_uri()
    prefix = "diagnose/" if run_id else ""
    m = {f"{prefix}loss/ref_total": r["ref_total"]["loss"], f"{prefix}jstar/ref_total": r["ref_total"]["jstar"],
         f"{prefix}gap/ref_total": r["ref_total"]["gap"]}
    for i, s in enumerate(r["sigmas"]):
        k = sigma_key(s)
        m.update({f"{prefix}loss_x0/sigma_{k}": r["loss_x0"][i], f"{prefix}gap/sigma_{k}": r["gap"][i],
                  f"{prefix}jstar/sigma_{k}": r["jstar"][i], f"{prefix}stderr/sigma_{k}": r["stderr"][i]})
        if "test_loss_x0" in r:
            m[f"{prefix}loss_x0_test/sigma_{k}"] = r["test_loss_x0"][i]
    if "memorisation" in r:
        m[f"{prefix}memorisation/copy_share"] = r["memorisation"]["copy_share"]
        m[f"{prefix}memorisation/ratio_median"] = r["memorisation"]["ratio_median"]
    if run_id is None:
        run_id = create_run(uri, "diagnose", f"diagnose {loaded.description}"[:250],
                            {"edm_opt.dataset_fingerprint": r["data"]["fingerprint"], "edm_opt.model": loaded.description})
    log_now(uri, run_id, m, step=loaded.nimg or 0, params=None if prefix else {"model": loaded.description,
            "data": r["data"]["source"], "per_sigma": r["per_sigma"]},
            artifacts=[(json_path, "diagnose"), (png, "diagnose")])
    if not prefix:
        from .tracking import set_run_status

        set_run_status(uri, run_id, "FINISHED")
    return run_id


def gap_fid_report(uri: str, experiment: str, out: Path, parent_run_id: str | None = None, echo=print) -> list:
    """`edm-opt diagnose --runs EXPERIMENT`: per-sigma correlation of gap and FID across snapshots (table, plot)."""
    from .fileio import write_json
    from .plots import plot_gap_fid

    points = gap_fid_points(uri, experiment, parent_run_id)
    if not points:
        raise DiagnoseError(f"no snapshots with FID in experiment {experiment!r} at {uri}: run `edm-opt evaluate` "
                            f"on its runs (or train with --fid-every) first")
    corr = gap_fid_correlation(points)
    echo(f"gap vs FID across {len(points)} snapshots of {len({p.run_id for p in points})} runs in {experiment!r}")
    echo(f"{'sigma':>8} {'pearson':>8} {'spearman':>9} {'n':>4}")
    for c in corr:
        echo(f"{sigma_key(c.sigma):>8} {c.pearson:8.3f} {c.spearman:9.3f} {c.n:4d}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gap_fid.json", {"points": [p.__dict__ for p in points], "correlation": [c.__dict__ for c in corr]})
    echo(f"wrote {plot_gap_fid(points, corr, out / 'gap_fid.png')}")
    return corr
