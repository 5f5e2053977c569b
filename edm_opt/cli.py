"""The `edm-opt` command line. Runner scripts in `runners/` call these same commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import EdmOptError, __version__

DATA_HELP = ("'digits' (built in), a directory of IDX files (e.g. /usr/share/datasets/fashion-mnist), "
             "a *-ubyte[.gz] file, an EDM .zip or folder of PNGs, a .npz, or the CIFAR-10 python tarball")


class _Group(click.Group):
    """Turns EdmOptError (bad input) into one clear message and exit status 1; bugs keep their traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdmOptError as e:
            raise click.ClickException(str(e)) from None


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
def estimate(source, resolution, xflip, estimator, sigmas, class_conditional, num_samples, subset_size, correction,
             seed, device, out, plot, no_cache):
    """Estimate the optimal loss J*_sigma (x0 MSE per dimension) of a training set.

    Tables are cached in $EDM_OPT_CACHE/jstar/ (default ~/.cache/edm-opt) by dataset fingerprint and
    parameters, so training runs with --jstar auto reuse them.
    """
    from .data import load_dataset
    from .diffusion import parse_sigmas
    from .optimal_loss import estimate_for_dataset

    try:
        grid = parse_sigmas(sigmas)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--sigmas") from None
    dataset = load_dataset(source, resolution, xflip, progress=True)
    click.echo(f"{dataset.spec.source}: {dataset.num_images} images {tuple(dataset.images.shape[1:])}, "
               f"fingerprint {dataset.fingerprint[:16]}", err=True)
    table, cached = estimate_for_dataset(dataset, grid, estimator, class_conditional, num_samples, subset_size,
                                         correction, seed, resolve_device(device), progress=True,
                                         use_cache=not no_cache)
    click.echo(table.format())
    click.echo(f"estimator {estimator}, {table.meta['wall_time_s']:.1f} s"
               + (f"; cached at {cached}" if cached else ""), err=True)
    if out:
        click.echo(f"wrote {table.save(out)}", err=True)
    if plot:
        from .plots import plot_jstar

        click.echo(f"wrote {plot_jstar({estimator: table}, plot, title=Path(dataset.spec.source).name)}", err=True)


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
def data_convert(source, out, resolution, split):
    """Write SOURCE in EDM's ZIP format (PNGs + dataset.json with labels)."""
    from .data import load_dataset, write_edm_zip

    if not out.endswith(".zip"):
        raise click.BadParameter("the destination must end in .zip", param_hint="--out")
    dataset = load_dataset(source, resolution, split=split, progress=True)
    path = write_edm_zip(dataset, out, progress=True)
    click.echo(f"wrote {path}: {dataset.num_images} images, fingerprint {dataset.fingerprint[:16]}")


# --------------------------------------------------------------------------------------------------
# edm-opt demo


@main.command()
@click.option("--data", "source", default="digits", show_default=True, help=f"Training data: {DATA_HELP}.")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo writes its tables, figures and report.")
def demo(source, out):
    """The whole edm-opt story on one laptop CPU (what `make demo` runs)."""
    from .demo import run_demo

    run_demo(source, Path(out))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
