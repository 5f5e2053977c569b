"""Dataset loading for every supported format, preprocessing, fingerprints, the EDM ZIP round trip."""

import gzip
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm_opt.data import DatasetError, DataSpec, load_dataset, write_edm_zip

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.fixture
def small_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 6, 6), dtype=np.uint8), rng.integers(0, 3, size=7)


def test_digits_builtin():
    d = load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.uint8
    assert int(d.images.max()) == 255 and int(d.images.min()) == 0  # round(16 * 255 / 16)
    assert set(torch.unique(d.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert d.num_classes == 10 and d.labels.shape == (1797,)
    x = d.to_float()
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert d.describe()["data_variance_per_dim"] == pytest.approx(0.293, abs=5e-4)  # method.md


def test_idx_directory_file_and_pairing(tmp_path, small_images):
    images, labels = small_images
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:3], gz=False)
    d = load_dataset(str(tmp_path))
    np.testing.assert_array_equal(d.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(d.labels.numpy(), labels)
    single = load_dataset(str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert single.fingerprint == d.fingerprint  # labels paired by name for a single file too
    test = load_dataset(str(tmp_path), split="test")
    assert test.num_images == 3 and test.labels is None


def test_idx_errors_name_the_file(tmp_path, small_images):
    images, _ = small_images
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)
    with pytest.raises(DatasetError, match="bad-images-idx3-ubyte.*magic"):
        load_dataset(str(bad))
    full = gzip.compress(bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in images.shape)
                         + images.tobytes())
    trunc = tmp_path / "trunc-images-idx3-ubyte.gz"
    trunc.write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match="trunc-images-idx3-ubyte.gz"):
        load_dataset(str(trunc))
    short = tmp_path / "short-images-idx3-ubyte"
    write_idx(short, images, gz=False)
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="short-images-idx3-ubyte.*truncated"):
        load_dataset(str(short))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .png"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "missing.zip"))


def test_png_folder_zip_round_trip(tmp_path, small_images):
    images, labels = small_images
    folder = tmp_path / "pngs"
    (folder / "sub").mkdir(parents=True)
    names = []
    for i, im in enumerate(images):
        name = f"sub/im{i}.png"
        Image.fromarray(im).save(folder / name)
        names.append(name)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, int(c)] for n, c in zip(names, labels)]}))
    d = load_dataset(str(folder))
    np.testing.assert_array_equal(d.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(d.labels.numpy(), labels)
    z = write_edm_zip(d, tmp_path / "out" / "data.zip")
    with zipfile.ZipFile(z) as zf:
        assert "00000/img00000000.png" in zf.namelist()
        meta = json.loads(zf.read("dataset.json"))
        assert meta["labels"][3] == ["00000/img00000003.png", int(labels[3])]
    back = load_dataset(str(z))
    assert back.fingerprint == d.fingerprint  # same pixels and labels, another path
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_bad_png_and_mixed_sizes_name_the_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="b.png"):
        load_dataset(str(folder))
    (folder / "b.png").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(folder / "c.png")
    with pytest.raises(DatasetError, match="c.png.*one size"):
        load_dataset(str(folder))
    zpath = tmp_path / "broken.zip"
    zpath.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DatasetError, match="broken.zip"):
        load_dataset(str(zpath))


def test_dataset_json_missing_label(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / n)
    (folder / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(DatasetError, match="dataset.json.*b.png"):
        load_dataset(str(folder))


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=nhwc, labels=np.arange(5))
    d = load_dataset(str(tmp_path / "a.npz"))
    assert d.images.shape == (5, 3, 4, 4)
    np.testing.assert_array_equal(d.images.permute(0, 2, 3, 1).numpy(), nhwc)
    np.savez(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2))
    assert load_dataset(str(tmp_path / "b.npz")).fingerprint != d.fingerprint  # no labels
    np.savez(tmp_path / "c.npz", images=nhwc.astype(np.float32))
    with pytest.raises(DatasetError, match="c.npz.*uint8"):
        load_dataset(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", pixels=nhwc)
    with pytest.raises(DatasetError, match="d.npz.*'images'"):
        load_dataset(str(tmp_path / "d.npz"))


def test_cifar10_tarball(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    d = load_dataset(str(path))
    assert d.images.shape == (20, 3, 32, 32) and d.num_classes == 10
    assert load_dataset(str(path), split="test").num_images == 4

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        raw = pickle.dumps({b"data": Path("x")})  # a class the restricted unpickler must refuse
        for name in [f"data_batch_{i}" for i in range(1, 6)]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    with pytest.raises(DatasetError, match="evil.tar.gz.*refusing"):
        load_dataset(str(evil))


def test_preprocessing_and_fingerprint():
    d = load_dataset("digits")
    padded = load_dataset("digits", resolution=12)
    assert padded.images.shape == (1797, 1, 12, 12) and padded.preprocessing == "pad12"
    assert torch.equal(padded.images[:, :, 2:10, 2:10], d.images) and int(padded.images[:, :, :2].max()) == 0
    resized = load_dataset("digits", resolution=4)
    assert resized.images.shape == (1797, 1, 4, 4) and resized.preprocessing == "resize4"
    flipped = load_dataset("digits", xflip=True)
    assert flipped.num_images == 2 * d.num_images and torch.equal(flipped.images[1797:], d.images.flip(-1))
    fps = {d.fingerprint, padded.fingerprint, resized.fingerprint, flipped.fingerprint}
    assert len(fps) == 4 and all(len(f) == 64 for f in fps)
    assert load_dataset("digits").fingerprint == d.fingerprint  # deterministic
    spec = DataSpec.from_dict(padded.spec.to_dict())
    assert spec.load().fingerprint == padded.fingerprint


@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
    d = load_dataset(str(FASHION))
    assert d.images.shape == (60000, 1, 28, 28) and d.num_classes == 10
    assert d.describe()["data_variance_per_dim"] == pytest.approx(0.348, abs=5e-4)  # method.md
    p = load_dataset(str(FASHION), resolution=32)
    assert p.describe()["data_variance_per_dim"] == pytest.approx(0.266, abs=5e-4)
    assert load_dataset(str(FASHION), split="test").num_images == 10000
