"""Loading any model as a VE x0 denoiser: edm-opt run directories and snapshots, official EDM2 / EDM state dicts,
and `package.module:factory` with any native target (what `diagnose`, `evaluate` and `sample` load)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import EdmOptError
from .diffusion import NativeDenoiser
from .networks import build_network, get_preset
from .networks.presets import ARCHITECTURES
from .rundir import RunDir, load_snapshot


class ModelLoadError(EdmOptError, ValueError):
    """A model that cannot be loaded; the message names the file or option."""


@dataclass
class Snapshot:
    net: torch.nn.Module
    nimg: int
    path: Path
    meta: dict


def load_snapshot_network(path: str | Path, device="cpu", ema: str | None = None) -> Snapshot:
    """An edm-opt snapshot file as an eval-mode network on `device`: the EMA profile `ema` (e.g. power:0.15;
    default: the first profile, `net`)."""
    snap = load_snapshot(path)
    spec = snap["network"]
    net = ARCHITECTURES[spec["arch"]](**spec["kwargs"])
    profiles = {snap.get("ema"): snap["net"], **snap.get("ema_profiles", {})}
    if ema is not None and ema not in profiles:
        raise ModelLoadError(f"{path}: no EMA profile {ema!r} (has {', '.join(str(k) for k in profiles)})")
    net.load_state_dict(profiles[ema] if ema is not None else snap["net"])
    return Snapshot(net.eval().requires_grad_(False).to(device), int(snap["nimg"]), Path(path), snap)


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
    path = Path(model).expanduser()
    if path.is_dir():
        run = RunDir(path)
        info = run.read_info()
        nimg, snap_path = run.snapshot_path(snapshot)
        snap = load_snapshot_network(snap_path)
        return LoadedModel(snap.net, f"{run.path.name} @ {nimg:,} images", nimg, info.data,
                           snap.meta.get("class_conditional"), info.config.get("heldout_per_sigma"),
                           info.jstar.get("path"), str(run.path))
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a torch state dict or edm-opt snapshot ({type(e).__name__}: {e}); "
                                f"official .pkl files: export `net.state_dict()` with torch.save first") from None
        if isinstance(obj, dict) and "network" in obj and "net" in obj:
            snap = load_snapshot_network(path)
            return LoadedModel(snap.net, f"{path.name} @ {snap.nimg:,} images", snap.nimg, snap.meta.get("data"),
                               snap.meta.get("class_conditional"))
        return LoadedModel(_net_from_state_dict(obj, path, preset, network_kwargs), f"{path.name} ({preset})")
    if ":" in model:
        mod_name, _, factory = model.partition(":")
        try:
            module = getattr(importlib.import_module(mod_name), factory)()
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"cannot load {model!r}: {e}") from None
        net = NativeDenoiser(module, target, precond).eval()
        if img_shape is not None:
            for attr, v in zip(("img_channels", "img_resolution"), img_shape):
                if not hasattr(net, attr):
                    setattr(net, attr, v)
        if not hasattr(net, "label_dim"):
            net.label_dim = 0
        return LoadedModel(net, f"{model} ({target} target, {precond} preconditioning)")
    raise ModelLoadError(f"model {model!r} not found: give a run directory, a snapshot or state-dict file, "
                        f"or module:factory")


def _net_from_state_dict(state: dict, path: Path, preset: str | None, network_kwargs: dict | None):
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors")
    if preset is None:
        raise ModelLoadError(f"{path}: a state dict needs --preset (and --network-kwargs for non-preset settings) "
                            f"to build the network")
    try:
        arch = get_preset(preset).arch
    except ValueError as e:
        raise ModelLoadError(f"--preset: {e}") from None
    kw = dict(network_kwargs or {})
    if arch == "edm2":
        first = next((k for k in state if k.startswith("unet.enc.") and k.endswith("_conv.weight")), None)
        if first is None:
            raise ModelLoadError(f"{path}: no `unet.enc.*_conv.weight`: not the official EDM2 layout that preset "
                                f"{preset!r} needs")
        kw.setdefault("img_resolution", int(first.split(".")[2].split("x")[0]))
        kw.setdefault("img_channels", int(state[first].shape[1]) - 1)  # the ones channel
        kw.setdefault("label_dim", int(state["unet.emb_label.weight"].shape[1]) if "unet.emb_label.weight" in state else 0)
    else:
        first = next((k for k in state if k.startswith("model.enc.") and k.endswith("_conv.weight")), None)
        if first is None:
            raise ModelLoadError(f"{path}: no `model.enc.*_conv.weight`: not the official EDM (DDPM++) layout that "
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
        raise ModelLoadError(f"{path} does not fit preset {preset!r}: {str(e).splitlines()[0][:500]}") from None
    return net.eval()
