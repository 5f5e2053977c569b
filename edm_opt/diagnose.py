"""`edm-opt diagnose`: the per-sigma held-out loss and gap to J* of any model, and memorisation statistics.

Models are loaded by `edm_opt.loading` (runs, snapshots, official state dicts, module:factory) and measured on
the fixed held-out set of `edm_opt.heldout`, the one every training run on the dataset uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import EdmOptError
from . import contract as C
from .data import DataSpec, load_dataset
from .diffusion import parse_sigmas, reference_total, sigma_grid, sigma_key
from .fileio import write_json
from .heldout import HeldOutSet, heldout_losses, largest_gap, negative_gaps
from .loading import LoadedModel, load_model
from .optimal_loss import OptimalLossTable, resolve_jstar
from .plots import plot_diagnosis
from .sampling import generate
from .tracking import create_run, default_tracking_uri, log_now, set_run_status


class DiagnoseError(EdmOptError, ValueError):
    """A model or input that cannot be diagnosed; the message names the file or option."""


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


def diagnose(loaded: LoadedModel, dataset, jstar, *, per_sigma: int = 64, class_conditional: bool = False,
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
        images, _ = generate(net, range(samples), batch_size=64, num_steps=steps, device=device, progress=progress)
        out["memorisation"] = memorisation(images, dataset, threshold)
    return out


# --------------------------------------------------------------------------------------------------
# The command: inputs resolved, outputs written and logged.


def run_diagnosis(model: str, data: str | None, out: Path, *, jstar: str = "auto", sigmas: str | None = None,
                  per_sigma: int | None = None, target: str = "x0", precond: str = "edm", preset: str | None = None,
                  network_kwargs: dict | None = None, snapshot: str = "latest", resolution: int | None = None,
                  class_conditional: bool | None = None, test_data: str | None = None, samples: int = 0,
                  steps: int = 32, threshold: float = 1 / 3, run_id: str | None = None, device: str = "cpu",
                  echo=print) -> dict:
    """`edm-opt diagnose MODEL`: measure, print a table, write DIR/diagnose.json and DIR/diagnose.png, log."""

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
    result = diagnose(loaded, dataset, table, per_sigma=per_sigma, class_conditional=class_conditional, device=device,
                      test_dataset=test, samples=samples, steps=steps, threshold=threshold, progress=True)
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
    uri = default_tracking_uri()
    prefix = "diagnose/" if run_id else ""
    m = {C.LOSS_REF: r["ref_total"]["loss"], C.JSTAR_REF: r["ref_total"]["jstar"], C.GAP_REF: r["ref_total"]["gap"]}
    for family, values in ((C.LOSS_X0, r["loss_x0"]), (C.GAP, r["gap"]), (C.JSTAR, r["jstar"]),
                           (C.STDERR, r["stderr"]), (C.LOSS_X0_TEST, r.get("test_loss_x0"))):
        if values is not None:
            m.update(C.sigma_metrics(family, r["sigmas"], values))
    m = {prefix + k: v for k, v in m.items()}
    if "memorisation" in r:
        m[f"{prefix}memorisation/copy_share"] = r["memorisation"]["copy_share"]
        m[f"{prefix}memorisation/ratio_median"] = r["memorisation"]["ratio_median"]
    if run_id is None:
        run_id = create_run(uri, "diagnose", f"diagnose {loaded.description}"[:250],
                            {C.TAG_FINGERPRINT: r["data"]["fingerprint"], C.TAG_MODEL: loaded.description})
    log_now(uri, run_id, m, step=loaded.nimg or 0, params=None if prefix else {"model": loaded.description,
            "data": r["data"]["source"], "per_sigma": r["per_sigma"]},
            artifacts=[(json_path, "diagnose"), (png, "diagnose")])
    if not prefix:
        set_run_status(uri, run_id, "FINISHED")
    return run_id


