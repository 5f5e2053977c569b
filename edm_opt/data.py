"""Datasets as uint8 image tensors with optional integer labels; the EDM ZIP format; fingerprints.

Sources (`load_dataset(source)`):
- `digits`: scikit-learn's 1,797 8x8 grey digits, values 0..16 mapped to round(x * 255 / 16);
- IDX files (`*-ubyte`, `*-ubyte.gz`: MNIST, Fashion-MNIST): one images file, or a directory meaning its
  train (or `t10k` test) split, labels paired by name (`...-images-idx3-...` -> `...-labels-idx1-...`);
- an EDM-style ZIP or folder of PNG/JPEG images with optional `dataset.json` (`{"labels": [[name, int], ...]}`);
- the CIFAR-10 python tarball (`cifar-10-python.tar.gz`);
- `.npz` with `images` (uint8, NHW, NHWC or NCHW) and optional `labels`;
- latents (`edm_opt.latents`): an EDM-style ZIP or folder of `.npy` arrays [2C, H, W] (float16/32: the VAE's mean
  channels, then its std) whose `dataset.json` holds the per-channel constants,
  `{"labels": ..., "latents": {"raw_mean": [C], "raw_std": [C], "final_mean": 0, "final_std": 0.5}}`.

Images stay uint8 NCHW until a model needs them: `to_float` maps x -> x / 127.5 - 1 (data in [-1, 1]); latents stay
as stored moments, `to_float` gives their scaled means and `x0` a fresh sample per draw.
The fingerprint is a sha256 over the exact preprocessed uint8 tensor, its labels and the preprocessing
description; the source path is not part of it (the same pixels from another path are the same data).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import EdmOptError
from .fileio import atomic_path
from .latents import JSTAR_ON, LatentError, LatentScaling, decoder, sample_latents
from .progress import progress as progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(EdmOptError, ValueError):
    """A dataset that cannot be read: the message names the file and what is wrong."""


@dataclass(frozen=True)
class DataSpec:
    """How to load a dataset again: what a run directory stores (the source as an absolute path)."""

    source: str
    resolution: int | None = None
    xflip: bool = False
    split: str = "train"

    def load(self, progress: bool = False) -> "ImageDataset":
        return load_dataset(self.source, self.resolution, self.xflip, self.split, progress=progress)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**{k: d[k] for k in ("source", "resolution", "xflip", "split") if k in d})


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """uint8 images [N, C, H, W] and optional int64 labels [N], after preprocessing; for a latent dataset `images`
    holds the float moments [N, 2C, H, W] and `latent` their constants."""

    images: torch.Tensor
    labels: torch.Tensor | None
    spec: DataSpec
    preprocessing: str  # e.g. "none", "pad32", "resize16+xflip", "latents(...)": part of the fingerprint
    latent: LatentScaling | None = None

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        """Channels a model sees (C; a latent dataset stores 2C)."""
        return self.images.shape[1] // (2 if self.latent else 1)

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    @property
    def dim(self) -> int:
        """Dimensions per image (C x H x W): the D of per-dimension losses."""
        return self.channels * self.resolution ** 2

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(b"edm-opt-dataset-v1\0")
        h.update(json.dumps({"shape": list(self.images.shape), "preprocessing": self.preprocessing}).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(b"nolabels" if self.labels is None else self.labels.to(torch.int64).numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def to_float(self, device=None) -> torch.Tensor:
        """Images as float32 in [-1, 1]: x / 127.5 - 1; latents: their means, scaled (what J* is computed on)."""
        return self.x0(slice(None), device, stochastic=False)

    def x0(self, index, device=None, generator: torch.Generator | None = None, stochastic: bool = True) -> torch.Tensor:
        """Model inputs for the images `index`: x / 127.5 - 1; latents (mean + std eps) scale + shift, eps from
        `generator` on `device` (the scaled mean when not `stochastic`)."""
        x = self.images[index].to(device)
        if self.latent is None:
            return x.float() / 127.5 - 1
        return sample_latents(x, self.latent, generator, stochastic)

    def pixel_images(self, device=None) -> "torch.Tensor | DecodedLatents":
        """uint8 pixels [N, 3|1, R, R] (FID references): the images, or the latents' means decoded by the VAE
        when indexed (only the images a reference uses, and none when its statistics are cached)."""
        return self.images if self.latent is None else DecodedLatents(self, device or "cpu")

    def one_hot(self, device=None) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return torch.nn.functional.one_hot(self.labels, self.num_classes).float().to(device)

    def describe(self) -> dict:
        """What `edm-opt data info` prints and what runs log about their data."""
        x = self.to_float()
        info = {
            "source": self.spec.source,
            "split": self.spec.split,
            "count": self.num_images,
            "shape": [self.channels, self.resolution, self.resolution],
            "preprocessing": self.preprocessing,
            "fingerprint": self.fingerprint,
            "data_variance_per_dim": float(x.flatten(1).double().var(0, unbiased=False).mean()),
            "num_classes": self.num_classes,
        }
        if self.latent is not None:
            info["latents"] = {**self.latent.to_json(), "stored": list(self.images.shape[1:]),
                               "jstar_on": JSTAR_ON}
        if self.labels is not None:
            info["class_counts"] = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return info


class DecodedLatents:
    """A latent dataset's pixels, decoded by the VAE on indexing: `pixels[index]` is uint8 [len(index), 3, R, R]
    of the latents' means (what the FID reference compares generated images with). The VAE loads on first use."""

    def __init__(self, dataset: ImageDataset, device, batch: int = 16):
        self.dataset, self.device, self.batch, self._decode = dataset, device, batch, None

    def __len__(self) -> int:
        return self.dataset.num_images

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        if self._decode is None:
            self._decode = decoder(self.dataset.latent, self.device)
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        return torch.cat([self._decode(self.dataset.x0(idx[i:i + self.batch], stochastic=False))
                          for i in range(0, idx.numel(), self.batch)])


# --------------------------------------------------------------------------------------------------
# Loading


def load_dataset(source: str, resolution: int | None = None, xflip: bool = False, split: str = "train",
                 progress: bool = False) -> ImageDataset:
    """Load `source` as uint8 NCHW images (+ labels), pad or resize to `resolution`, optionally add x-flips.

    Raises DatasetError naming the file for anything missing, corrupt or inconsistent.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}: expected 'train' or 'test'")
    if source == "digits":
        if split != "train":
            raise DatasetError("the built-in 'digits' dataset has no test split")
        (images, labels), abs_source, latent = _load_digits(), "digits", None
    else:
        path = Path(source).expanduser().resolve()
        abs_source = str(path)
        if not path.exists():
            raise DatasetError(f"dataset {source!r} not found: expected 'digits', a directory of IDX files or "
                               f"images, a .zip, a .npz or the CIFAR-10 python tarball")
        images, labels, latent = _load_path(path, split, progress)
    if images.shape[0] < 2:
        raise DatasetError(f"dataset {abs_source!r} holds {images.shape[0]} image(s); J* and training need at least 2")
    if latent is not None:
        if resolution not in (None, images.shape[-1]):
            raise DatasetError(f"{abs_source}: latents are {images.shape[-1]}x{images.shape[-1]} and cannot be "
                               f"resized to {resolution}; encode the images at that resolution instead")
        if xflip:
            raise DatasetError(f"{abs_source}: x-flipped latents are not the latents of flipped images; encode the "
                               f"flipped images into the dataset instead of --xflip")
        spec = DataSpec(abs_source, resolution, xflip, split)
        return ImageDataset(images.contiguous(), labels, spec, latent.describe(), latent)
    try:
        images, prep = _preprocess(images, resolution)
    except DatasetError as e:
        raise DatasetError(f"{abs_source}: {e}") from None
    if xflip:
        images = torch.cat([images, images.flip(-1)])
        labels = None if labels is None else torch.cat([labels, labels])
        prep = prep + "+xflip"
    spec = DataSpec(abs_source, resolution, xflip, split)
    return ImageDataset(images.contiguous(), labels, spec, prep)


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()  # images [1797, 8, 8] with values 0..16
    images = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    return images, torch.from_numpy(d.target.astype(np.int64))


def _load_path(path: Path, split: str, progress: bool):
    name = path.name.lower()
    if path.is_dir():
        if any("-ubyte" in p.name for p in path.iterdir()):
            return (*_load_idx_dir(path, split), None)
        _no_test_split(path, split)
        return _load_image_collection(_DirFiles(path), path, progress)
    if "-ubyte" in name:
        labels_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        images = _images_from_idx(path)
        labels = _read_idx(labels_path) if labels_path != path and labels_path.exists() else None
        return images, _check_labels(labels, len(images), labels_path), None
    if name.endswith(".zip"):
        _no_test_split(path, split)
        try:
            with zipfile.ZipFile(path) as zf:
                return _load_image_collection(_ZipFiles(zf), path, progress)
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{path}: not a readable ZIP file ({e})") from None
    if name.endswith(".npz"):
        _no_test_split(path, split)
        return (*_load_npz(path), None)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return (*_load_cifar10(path, split), None)
    raise DatasetError(f"{path}: unknown dataset format (expected a directory, *-ubyte[.gz], .zip, .npz or "
                       f"the CIFAR-10 python tarball)")


def _no_test_split(path: Path, split: str) -> None:
    if split != "train":
        raise DatasetError(f"{path}: this format has no {split} split")


# IDX (MNIST / Fashion-MNIST): magic 0x0000 0x08 <ndim>, big-endian int32 sizes, then unsigned bytes.

def _read_idx(path: Path) -> np.ndarray:
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DatasetError(f"{path}: wrong magic number {raw[:4].hex() or '(empty file)'}; expected 000008xx "
                           f"(an unsigned-byte IDX file)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DatasetError(f"{path}: IDX payload is {len(raw) - header} bytes, the header promises {count} "
                           f"for shape {shape} (truncated or corrupt file)")
    return np.frombuffer(raw, np.uint8, count, header).reshape(shape)


def _images_from_idx(path: Path) -> torch.Tensor:
    x = _read_idx(path)
    if x.ndim != 3:
        raise DatasetError(f"{path}: expected an IDX images file (3 dimensions), got shape {x.shape}")
    return torch.from_numpy(x.copy())[:, None]


def _load_idx_dir(path: Path, split: str):
    prefix = "train-images" if split == "train" else "t10k-images"
    found = sorted(p for p in path.iterdir() if p.name.startswith(prefix) and "-ubyte" in p.name)
    if not found:
        raise DatasetError(f"{path}: no '{prefix}-idx3-ubyte[.gz]' file for the {split} split")
    images_path = found[0]
    labels_path = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1"))
    images = _images_from_idx(images_path)
    labels = _read_idx(labels_path) if labels_path.exists() else None
    return images, _check_labels(labels, len(images), labels_path)


def _check_labels(labels, count: int, path) -> torch.Tensor | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != count:
        raise DatasetError(f"{path}: {labels.shape[0]} labels for {count} images")
    if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise DatasetError(f"{path}: labels must be non-negative integers")
    return torch.from_numpy(labels.astype(np.int64))


# Folders and ZIPs of images, with an optional dataset.json.

class _DirFiles:
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)).replace(os.sep, "/") for p in self.root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


class _ZipFiles:
    def __init__(self, zf: zipfile.ZipFile):
        self.zf = zf

    def names(self) -> list[str]:
        return sorted(n for n in self.zf.namelist() if not n.endswith("/"))

    def read(self, name: str) -> bytes:
        return self.zf.read(name)


def _load_image_collection(files, path: Path, progress: bool):
    """(uint8 images, labels, None) from PNG/JPEG files, or (moments, labels, LatentScaling) from .npy latents."""
    from PIL import Image
    names = files.names()
    image_names = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not image_names and any(n.lower().endswith(".npy") for n in names):
        return _load_latent_collection(files, path, progress)
    if not image_names:
        raise DatasetError(f"{path}: no .png/.jpg images (or .npy latents) found")
    arrays, mode, size = [], None, None
    for name in progress_bar(image_names, desc=f"reading {path.name}", disable=not progress, unit="img"):
        try:
            with Image.open(io.BytesIO(files.read(name))) as im:
                im.load()
                im = im if im.mode in ("L", "RGB") else im.convert("L" if im.mode in ("1", "I", "I;16", "LA") else "RGB")
                a = np.asarray(im)
        except Exception as e:  # PIL raises many types for corrupt files
            raise DatasetError(f"{path}/{name}: unreadable image ({type(e).__name__}: {e})") from None
        if size is None:
            mode, size = im.mode, a.shape
        elif a.shape != size:
            raise DatasetError(f"{path}/{name}: image of shape {a.shape}, but {image_names[0]} has {size}; all images "
                               f"of a dataset must share one size and mode (resize them before packing)")
        arrays.append(a)
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    labels = None
    if "dataset.json" in names:
        labels = _labels_from_json(_dataset_json(files.read("dataset.json"), path), image_names, path)
    return torch.from_numpy(np.ascontiguousarray(x)), labels, None


def _load_latent_collection(files, path: Path, progress: bool):
    names = files.names()
    arrays = [n for n in names if n.lower().endswith(".npy")]
    if "dataset.json" not in names:
        raise DatasetError(f"{path}: latents (.npy) without dataset.json; a latent dataset needs its scaling "
                           f"constants there: {{\"latents\": {{\"raw_mean\": [...], \"raw_std\": [...]}}}}")
    meta = _dataset_json(files.read("dataset.json"), path)
    if meta.get("latents") is None:  # before any array is read: a latent dataset is useless without them
        raise DatasetError(f"{path}/dataset.json: no 'latents' constants (raw_mean, raw_std per channel, "
                           f"final_mean, final_std); a latent dataset cannot be scaled without them")
    out, shape, latent = [], None, None
    for name in progress_bar(arrays, desc=f"reading {path.name}", disable=not progress, unit="latent"):
        try:
            a = np.load(io.BytesIO(files.read(name)), allow_pickle=False)
        except Exception as e:  # numpy raises ValueError, OSError, EOFError for corrupt files
            raise DatasetError(f"{path}/{name}: unreadable .npy ({type(e).__name__}: {e})") from None
        if a.dtype not in (np.float16, np.float32) or a.ndim != 3 or a.shape[0] % 2 or a.shape[1] != a.shape[2]:
            raise DatasetError(f"{path}/{name}: a latent must be a float16/float32 array [2C, H, H] (mean channels, "
                               f"then std), got {a.dtype} {list(a.shape)}")
        if shape is None:
            shape = a.shape
            try:  # the constants against the first array's channels, before the others are read
                latent = LatentScaling.from_json(meta["latents"], shape[0] // 2, f"{path}/dataset.json")
            except LatentError as e:
                raise DatasetError(str(e)) from None
        elif a.shape != shape:
            raise DatasetError(f"{path}/{name}: latent of shape {list(a.shape)}, but {arrays[0]} has {list(shape)}")
        if not np.isfinite(a).all() or (a[a.shape[0] // 2:] < 0).any():
            raise DatasetError(f"{path}/{name}: latents must be finite with std channels >= 0")
        out.append(a)
    labels = _labels_from_json(meta, arrays, path)
    moments = torch.from_numpy(np.stack(out))
    return moments if moments.dtype == torch.float16 else moments.float(), labels, latent


def _dataset_json(raw: bytes, path: Path) -> dict:
    """`dataset.json` of a folder or zip, parsed once: a JSON object, or DatasetError naming the file."""
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise DatasetError(f"{path}/dataset.json: not a JSON object ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}/dataset.json: not a JSON object (a {type(meta).__name__})")
    return meta


def _labels_from_json(meta: dict, image_names: list[str], path: Path):
    entries = meta.get("labels")
    if entries is None:
        return None
    try:
        table = {str(n).replace("\\", "/"): int(c) for n, c in entries}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}/dataset.json: 'labels' must be a list of [name, int] pairs ({e})") from None
    missing = [n for n in image_names if n not in table]
    if missing:
        raise DatasetError(f"{path}/dataset.json: no label for {missing[0]} ({len(missing)} images unlabelled)")
    return _check_labels(np.array([table[n] for n in image_names]), len(image_names), f"{path}/dataset.json")


def _load_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise DatasetError(f"{path}: no 'images' array (keys: {', '.join(z.files) or 'none'})")
            x = z["images"]
            labels = z["labels"] if "labels" in z else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: cannot read .npz ({e})") from None
    if x.dtype != np.uint8:
        raise DatasetError(f"{path}: 'images' must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DatasetError(f"{path}: 'images' must be NHW, NHWC or NCHW with 1 or 3 channels, got {x.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x))
    return images, _check_labels(labels, len(images), f"{path}['labels']")


class _CifarUnpickler(pickle.Unpickler):
    """Reads the CIFAR-10 batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar10(path: Path, split: str):
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    try:
        with tarfile.open(path) as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            for name in wanted:
                if name not in members:
                    raise DatasetError(f"{path}: no '{name}' member; expected the CIFAR-10 python tarball")
                batch = _CifarUnpickler(tf.extractfile(members[name]), encoding="bytes").load()
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, KeyError) as e:
        raise DatasetError(f"{path}: cannot read the CIFAR-10 tarball ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# --------------------------------------------------------------------------------------------------
# Preprocessing


def _preprocess(images: torch.Tensor, resolution: int | None) -> tuple[torch.Tensor, str]:
    """Zero-pad (centred) a smaller image, or centre-crop to square and Lanczos-resize a larger one."""
    _, _, h, w = images.shape
    if resolution is None or (h == w == resolution):
        if resolution is None and h != w:
            raise DatasetError(f"images are {h}x{w}; non-square data needs --resolution")
        return images, "none"
    if resolution <= 0:
        raise DatasetError(f"resolution must be positive, got {resolution}")
    if h <= resolution and w <= resolution:
        top, left = (resolution - h) // 2, (resolution - w) // 2
        out = torch.zeros(images.shape[0], images.shape[1], resolution, resolution, dtype=torch.uint8)
        out[:, :, top:top + h, left:left + w] = images
        return out, f"pad{resolution}"
    from PIL import Image

    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    out = np.empty((images.shape[0], resolution, resolution, images.shape[1]), dtype=np.uint8)
    for i, im in enumerate(images[:, :, top:top + side, left:left + side].permute(0, 2, 3, 1).numpy()):
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        r = np.asarray(pil.resize((resolution, resolution), Image.LANCZOS))
        out[i] = r[..., None] if r.ndim == 2 else r
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), f"resize{resolution}"


def hold_out(dataset: ImageDataset, count: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split off `count` images that training never sees (for diagnose --test-data when a dataset has no test
    split): (kept, held out), drawn at random with `seed`, in proportion to each class for labelled data, each
    part in the dataset's order."""
    n = dataset.num_images
    if not 0 < count < n:
        raise DatasetError(f"hold-out: {count} images out of the {n} of {dataset.spec.source}; expected 1 to {n - 1}")
    if dataset.latent is not None:
        raise DatasetError("hold-out: latent datasets are split by their own tools, not rewritten as images")
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, np.int64) if dataset.labels is None else dataset.labels.numpy()
    classes, sizes = np.unique(labels, return_counts=True)
    quota = np.floor(count * sizes / n).astype(np.int64)  # largest remainders fill up to `count`
    quota[np.argsort(-(count * sizes / n - quota), kind="stable")[:count - quota.sum()]] += 1
    held = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), q, replace=False)
                                   for c, q in zip(classes, quota)]))
    mask = np.ones(n, bool)
    mask[held] = False

    def part(idx: np.ndarray) -> ImageDataset:
        idx = torch.from_numpy(idx)
        return ImageDataset(dataset.images[idx], None if dataset.labels is None else dataset.labels[idx],
                            dataset.spec, dataset.preprocessing)

    return part(np.flatnonzero(mask)), part(held)


# --------------------------------------------------------------------------------------------------
# Writing the EDM ZIP format: PNGs at `{i // 1000:05d}/img{i:08d}.png` and `dataset.json`.


def write_edm_zip(dataset: ImageDataset, dest: str | os.PathLike, progress: bool = False) -> Path:
    """Write `dataset` as an EDM-style ZIP (atomically: a temporary file renamed into place)."""
    from PIL import Image

    dest = Path(dest).expanduser().resolve()
    with atomic_path(dest) as tmp:
        names = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for i, im in enumerate(progress_bar(dataset.images, desc=f"writing {dest.name}", disable=not progress,
                                                unit="img")):
                a = im.permute(1, 2, 0).numpy()
                buf = io.BytesIO()
                Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="png", compress_level=0)
                name = f"{i // 1000:05d}/img{i:08d}.png"
                zf.writestr(name, buf.getvalue())
                names.append(name)
            labels = None if dataset.labels is None else [[n, int(c)] for n, c in zip(names, dataset.labels)]
            zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return dest
