"""The fixed held-out set and the per-sigma held-out evaluation (DESIGN.md "Held-out set").

The held-out set is a fixed subset of the *training* images (J* is the floor on the training set):
`per_sigma` images per grid sigma with their noise, both drawn from a generator seeded by a constant and the
dataset's fingerprint, so every run on a dataset, and every later diagnosis of its snapshots, sees exactly the
same samples. Losses are per-dimension x0 MSE in VE coordinates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from . import contract as C
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
        noise = torch.randn(k * per_sigma, dataset.channels, dataset.resolution, dataset.resolution, generator=g)
        x0 = dataset.x0(idx, stochastic=False)  # latents: their scaled means, as J* is computed
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
    m = {**C.sigma_metrics(C.LOSS_X0, sigmas, loss), **C.sigma_metrics(C.STDERR, sigmas, stderr),
         **C.sigma_metrics(C.GAP, sigmas, np.asarray(loss) - np.asarray(jstar))}
    if raw_loss is not None:
        m.update(C.sigma_metrics(C.LOSS_X0_RAW, sigmas, raw_loss))
    ref, jref = reference_total(sigmas, loss), reference_total(sigmas, jstar)
    m.update({C.LOSS_REF: ref, C.JSTAR_REF: jref, C.GAP_REF: ref - jref})
    return m


def negative_gaps(sigmas, loss, stderr, jstar, z: float = 3.0) -> list[str]:
    """Grid sigmas where the held-out loss is below J* by more than z standard errors (a bug, or wrong J*)."""
    bad = (loss - jstar) < -z * np.maximum(stderr, 1e-12)
    return [f"sigma={sigma_key(s)}: loss {l:.4g} < J* {j:.4g} - {z:g} x {e:.2g}"
            for s, l, j, e, b in zip(sigmas, loss, jstar, stderr, bad) if b]


def largest_gap(sigmas, gap) -> tuple[float, float]:
    i = int(np.nanargmax(gap))
    return float(sigmas[i]), float(gap[i])
