"""`make demo`: the edm-opt story on one laptop CPU, one stage at a time, each timed and resumable."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import click

from . import EdmOptError

DEMO_SUBSET = 256  # cDOL subset size of the demo: small enough that cDOL visibly differs from the full estimator


@contextmanager
def stage(name: str, log: Path | None = None):
    """One line per stage with its elapsed time; a failure names the stage (and its log file)."""
    t0 = time.perf_counter()
    click.echo(click.style(f"==> {name}", bold=True), err=True)
    try:
        yield
    except Exception as e:
        where = f" (log: {log})" if log else ""
        raise EdmOptError(f"demo stage '{name}' failed{where}: {e}") from e
    click.echo(f"    {name}: done in {time.perf_counter() - t0:.1f} s", err=True)


def run_demo(source: str, out: Path) -> None:
    from .data import load_dataset
    from .diffusion import sigma_grid, sigma_key
    from .optimal_loss import estimate_for_dataset
    from .plots import plot_jstar

    out.mkdir(parents=True, exist_ok=True)
    with stage("J*_sigma of the data: full estimator vs cDOL"):
        dataset = load_dataset(source, progress=True)
        grid = sigma_grid()
        full, _ = estimate_for_dataset(dataset, grid, "full", progress=True)
        cdol, _ = estimate_for_dataset(dataset, grid, "cdol", subset_size=min(DEMO_SUBSET, dataset.num_images),
                                       progress=True)
        full.save(out / "jstar-full.json")
        cdol.save(out / "jstar-cdol.json")
        label = f"cDOL L={cdol.meta['params']['subset_size']}"
        plot = plot_jstar({"full": full, label: cdol}, out / "jstar.png", title=f"J*_sigma of {Path(source).name}")
        click.echo(f"{'sigma':>8} {'full':>11} {'+-':>8} {label:>13} {'+-':>8} {'rel. diff':>9}")
        for s, a, ea, b, eb in zip(grid, full.values, full.stderr, cdol.values, cdol.stderr):
            rel = f"{b / a - 1:+9.3f}" if a > 1e-3 * full.values[-1] else f"{'':>9}"
            click.echo(f"{sigma_key(s):>8} {a:11.5g} {ea:8.2g} {b:13.5g} {eb:8.2g} {rel}")
        click.echo(f"sigma* = {full.sigma_star:.3g}; data variance per dimension {full.data_variance:.4f}; "
                   f"full {full.meta['wall_time_s']:.1f} s, cDOL {cdol.meta['wall_time_s']:.1f} s")
        click.echo(f"plot: {plot}")
