"""FID/KID cost, measured side by side in one run.

1. Feature extraction with the real Inception-v3 weights (clean protocol), images/s on CPU and, when available,
   on CUDA: the clean resize alone, the network alone, and both (`extract_features`).
2. The Frechet distance of 2048-d statistics: edm-opt's eigh/SVD formula vs the eigenvalues of
   sqrt(S1) S2 sqrt(S1) vs scipy.linalg.sqrtm (run once: it is slow), with the accuracy of each on
   singular covariances (500 images) whose answers are known exactly.
3. KID per subset of 1000 2048-d features (the default runs 100 subsets).

Usage: python benchmarks/fid.py [--images 64] [--no-sqrtm]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.linalg
import torch

from edm_opt.metrics import (
    WeightsNotFound,
    clean_resize,
    extract_features,
    frechet_distance,
    kid_from_features,
    load_inception,
)


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_extraction(device: torch.device, num_images: int, batch_size: int) -> None:
    net, sha = load_inception(device=device)
    images = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (num_images, 3, 32, 32), dtype=np.uint8))
    where = (f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu"
             else torch.cuda.get_device_name(device))
    print(f"-- feature extraction on {device} ({where}); weights sha256 {sha[:12]}; "
          f"{num_images} 32x32 RGB images, batch {batch_size}")
    extract_features(images[:batch_size], net, batch_size, device)  # warm-up: TorchScript profiling runs
    extract_features(images[:batch_size], net, batch_size, device)
    resized = clean_resize(images[:batch_size]).to(device)

    num_batches = -(-num_images // batch_size)

    def network():
        with torch.no_grad():
            for _ in range(num_batches):
                net(resized)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def both():
        extract_features(images, net, batch_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t_resize = _timed(lambda: clean_resize(images))
    t_net = _timed(network) * num_images / (num_batches * batch_size)  # per num_images images
    t_both = _timed(both)
    print(f"clean resize alone      {num_images / t_resize:9.1f} images/s")
    print(f"Inception alone         {num_images / t_net:9.1f} images/s")
    print(f"extract_features (both) {num_images / t_both:9.1f} images/s "
          f"(50,000 reference images: about {50_000 / (num_images / t_both) / 60:.0f} min)")


def _sqrt_psd_eigvalsh(mu1, s1, mu2, s2) -> float:
    """The eigenvalues-of-sqrt(S1) S2 sqrt(S1) variant, for comparison."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def _sqrtm(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def bench_frechet(run_sqrtm: bool) -> None:
    dim, n = 2048, 500
    feats = np.random.default_rng(0).normal(size=(n, dim)) ** 2  # 500 images' worth: a rank-499 covariance
    mu = feats.mean(0)
    s = np.cov(feats, rowvar=False)
    exact_4s = float(np.trace(s))  # tr S + tr 4S - 2 tr sqrt(4 S^2) = tr S; and FID(S, S) = 0
    print(f"-- Frechet distance, {dim}-d statistics of {n} features (singular covariance); "
          f"exact answers: S vs 4S {exact_4s:.6f}, S vs S 0")
    rows = [("edm-opt (eigh + SVD)", frechet_distance), ("eigvalsh of sqrt(S1) S2 sqrt(S1)", _sqrt_psd_eigvalsh)]
    if run_sqrtm:
        print("   scipy.linalg.sqrtm runs once, on S vs 4S only: it is slow "
              "(15 to 90 s on 2 CPU cores, depending on the matrix)", flush=True)
        rows.append(("scipy.linalg.sqrtm", _sqrtm))
    first = None
    for name, fn in rows:
        start = time.perf_counter()
        value = fn(mu, s, mu, 4 * s)
        seconds = time.perf_counter() - start
        first = first or seconds
        same = f"{fn(mu, s, mu, s):+.2e}" if fn is not _sqrtm else "(not run)"
        print(f"{name:34s} {seconds:7.2f} s ({seconds / first:4.1f}x edm-opt)   error S vs 4S {value - exact_4s:+.2e}"
              f"   S vs S {same}", flush=True)


def bench_kid() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((3000, 2048), dtype=np.float32)
    b = rng.random((3000, 2048), dtype=np.float32)
    subsets = 5
    t = _timed(lambda: kid_from_features(a, b, subset_size=1000, num_subsets=subsets)) / subsets
    print(f"-- KID: {t:.2f} s per subset of 1000 2048-d features (default 100 subsets: about {100 * t:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images timed per device (default 64)")
    parser.add_argument("--no-sqrtm", action="store_true", help="skip the slow scipy.linalg.sqrtm reference")
    args = parser.parse_args()
    try:
        bench_extraction(torch.device("cpu"), args.images, batch_size=32)
        if torch.cuda.is_available():
            bench_extraction(torch.device("cuda"), max(args.images, 2048), batch_size=256)
        else:
            print("-- CUDA: not available, GPU figures skipped")
    except WeightsNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bench_frechet(not args.no_sqrtm)
    bench_kid()
    return 0


if __name__ == "__main__":
    sys.exit(main())
