"""Latent datasets (EDM2's img512 input): reading, per-draw sampling, scaling, J* on the means, training, bad input."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_args
from edm_opt.data import DatasetError, load_dataset
from edm_opt.latents import LatentError, LatentScaling, sample_latents
from edm_opt.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]  # EDM2's SD-VAE constants
CONSTANTS = {"raw_mean": RAW_MEAN, "raw_std": RAW_STD, "final_mean": 0, "final_std": 0.5}


def write_latents(path: Path, n: int = 96, res: int = 8, std: float = 0.3, meta: dict | None = None,
                  dtype=np.float16, labels: bool = True) -> Path:
    """A ZIP of n .npy latents [8, res, res] (4 mean channels ~ N(raw_mean, raw_std), then 4 std channels)."""
    rng = np.random.default_rng(0)
    names = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            mean = rng.normal(RAW_MEAN, RAW_STD, size=(res, res, 4)).transpose(2, 0, 1)
            buf = io.BytesIO()
            np.save(buf, np.concatenate([mean, np.full((4, res, res), std)]).astype(dtype))
            names.append(f"{i // 1000:05d}/img{i:08d}.npy")
            zf.writestr(names[-1], buf.getvalue())
        doc = {"labels": [[nm, i % 3] for i, nm in enumerate(names)] if labels else None, "latents": CONSTANTS}
        zf.writestr("dataset.json", json.dumps(doc if meta is None else meta))
    return path


def test_scaling_maps_raw_latents_to_the_target_moments():
    s = LatentScaling.from_json(CONSTANTS, 4, "x")
    z = torch.tensor(RAW_MEAN).reshape(1, 4, 1, 1) + torch.tensor(RAW_STD).reshape(1, 4, 1, 1) * torch.randn(
        20000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    x = s.apply(z)
    assert x.mean((0, 2, 3)).abs().max() < 0.02  # final_mean 0
    assert (x.std((0, 2, 3)) - 0.5).abs().max() < 0.01  # final_std 0.5
    torch.testing.assert_close(s.invert(x), z, rtol=1e-5, atol=1e-4)


def test_reading_sampling_and_the_means(tmp_path):
    ds = load_dataset(str(write_latents(tmp_path / "lat.zip")))
    assert (ds.num_images, ds.channels, ds.resolution, ds.dim, ds.num_classes) == (96, 4, 8, 256, 3)
    assert ds.images.dtype == torch.float16 and ds.images.shape[1] == 8
    assert ds.preprocessing.startswith("latents(") and ds.latent.raw_std == tuple(RAW_STD)
    means = ds.to_float()  # J* is computed on these: the scaled means, deterministic
    scale = 0.5 / torch.tensor(RAW_STD).reshape(1, 4, 1, 1)
    expect = (ds.images[:, :4].float() - torch.tensor(RAW_MEAN).reshape(1, 4, 1, 1)) * scale
    torch.testing.assert_close(means, expect, rtol=1e-5, atol=1e-5)
    # a draw is mean + std eps, scaled: its deviation from the mean is 0.3 * scale per channel
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([ds.x0(slice(None), generator=g) for _ in range(20)])
    dev = (draws - means).std((0, 1, 3, 4))
    torch.testing.assert_close(dev, 0.3 * scale.flatten(), rtol=0.05, atol=0)
    assert not torch.equal(draws[0], draws[1])
    # the same generator state gives the same draw (resume is exact)
    a = ds.x0([3, 5], generator=torch.Generator().manual_seed(7))
    b = sample_latents(ds.images[[3, 5]], ds.latent, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert ds.describe()["latents"]["jstar_on"].startswith("the scaled means")
    # the constants are part of the fingerprint
    other = dict(CONSTANTS, final_std=1.0)
    ds2 = load_dataset(str(write_latents(tmp_path / "lat2.zip", meta={"labels": None, "latents": other})))
    assert ds2.fingerprint != ds.fingerprint


@pytest.mark.parametrize("meta, needle", [
    ({"labels": None}, "no 'latents' constants"),
    ({"latents": {**CONSTANTS, "raw_mean": [0, 1, 2]}}, "latents.raw_mean must be 4 finite numbers"),
    ({"latents": {**CONSTANTS, "raw_std": [1, 1, 0, 1]}}, "latents.raw_std must be > 0"),
    ({"latents": {**CONSTANTS, "final_std": -1}}, "latents.final_std must be a finite number > 0"),
    ({"latents": {**CONSTANTS, "scale": 2}}, "unknown key latents.scale"),
])
def test_bad_constants_name_the_file_and_key(tmp_path, meta, needle):
    path = write_latents(tmp_path / "bad.zip", n=4, meta=meta)
    with zipfile.ZipFile(path, "a") as zf:  # a corrupt last latent: the constants are checked before it is read
        zf.writestr("zzzzz/corrupt.npy", b"not an array")
    with pytest.raises(DatasetError, match="dataset.json") as e:
        load_dataset(str(path))
    assert needle in str(e.value)


def test_dataset_json_must_be_an_object(tmp_path):
    path = write_latents(tmp_path / "list.zip", n=2, meta=[1, 2])
    with pytest.raises(DatasetError, match=r"list.zip/dataset.json: not a JSON object \(a list\)"):
        load_dataset(str(path))


def test_bad_latent_files_and_options(tmp_path):
    folder = tmp_path / "noconst"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", np.zeros((8, 4, 4), np.float32))
    with pytest.raises(DatasetError, match="without dataset.json"):
        load_dataset(str(folder))
    (folder / "dataset.json").write_text(json.dumps({"latents": CONSTANTS}))
    assert load_dataset(str(folder)).num_images == 3  # a folder works as the ZIP does
    np.save(folder / "3.npy", np.zeros((7, 4, 4), np.float32))
    with pytest.raises(DatasetError, match=r"3\.npy: a latent must be"):
        load_dataset(str(folder))
    np.save(folder / "3.npy", np.full((8, 4, 4), -1, np.float32))
    with pytest.raises(DatasetError, match="std channels >= 0"):
        load_dataset(str(folder))
    (folder / "3.npy").unlink()
    with pytest.raises(DatasetError, match="x-flipped latents"):
        load_dataset(str(folder), xflip=True)
    with pytest.raises(DatasetError, match="cannot be resized to 8"):
        load_dataset(str(folder), resolution=8)


def test_img512_preset_takes_latents(tmp_path):
    """edm2-img512-xs on 4 latent channels at 64x64: the official parameter count, and a forward pass on a draw."""
    ds = load_dataset(str(write_latents(tmp_path / "lat64.zip", n=2, res=64)))
    net = build_network("edm2-img512-xs", ds.resolution, ds.channels, 1000)
    assert sum(p.numel() for p in net.parameters()) == 124_713_253
    x0 = ds.x0([0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(x0 + 2.0 * torch.randn_like(x0), torch.tensor([2.0]), torch.eye(1000)[:1])
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()


def test_training_on_latents_and_fid_without_a_decoder(tmp_path):
    path = write_latents(tmp_path / "lat.zip")
    args = cli_args({"data": str(path), "preset": "edm2-nano", "batch": 32, "sigmas": "0.002:80:5",
                     "heldout_per_sigma": 8, "duration": 256, "status_every": 128, "snapshot_every": 256,
                     "checkpoint_every": 256, "schedule": "edm2"})
    p = subprocess.run([sys.executable, str(ROOT / "runners" / "train.py"), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sample grids show latent channels 0-2" in p.stdout + p.stderr
    (run,) = (tmp_path / "runs" / "edm-opt").iterdir()
    snap = torch.load(next(run.glob("snapshot-*.pt")), weights_only=False)
    assert snap["data"]["latents"]["raw_std"] == RAW_STD and snap["network"]["kwargs"]["img_channels"] == 4
    table = json.loads((run / "jstar.json").read_text())
    assert table["dataset"]["preprocessing"].startswith("latents(") and "means" in table["dataset"]["jstar_on"]
    from PIL import Image

    with Image.open(next(run.glob("samples-*.png"))) as im:
        assert im.mode == "RGB"  # latent channels 0-2 as a preview
    for cmd in (["evaluate", str(run), "--num-images", "8"], ["sample", str(run), "--seeds", "0-3", "--out",
                                                              str(tmp_path / "g.png")]):
        e = subprocess.run([str(Path(sys.executable).with_name("edm-opt")), *cmd], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert e.returncode != 0 and "VAE decoder" in e.stderr and "Traceback" not in e.stderr, e.stderr[-2000:]


class UpsamplingVAE(torch.nn.Module):
    """Stands in for the SD VAE (an optional download): decode = the first 3 latent channels, 8x nearest-upsampled,
    squashed to [-1, 1]. Counts the latents it decodes."""

    def __init__(self):
        super().__init__()
        self.decoded = 0

    def decode(self, z):
        self.decoded += z.shape[0]
        return {"sample": torch.tanh(z[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)}


def test_fid_reference_of_latents_decodes_only_its_images(tmp_path, monkeypatch):
    """The FID reference of a latent dataset decodes the latents it uses (not the whole dataset), and none when
    its statistics are cached; the pixels are the decoded scaled means, in the reference's fixed order."""
    from edm_opt import latents
    from edm_opt.metrics import reference_statistics

    monkeypatch.setenv("EDM_OPT_CACHE", str(tmp_path / "cache"))
    vae = UpsamplingVAE()
    monkeypatch.setitem(latents._VAE, "vae", vae)
    ds = load_dataset(str(write_latents(tmp_path / "lat.zip", n=96)))
    pixels = ds.pixel_images()
    assert len(pixels) == 96 and vae.decoded == 0  # nothing decoded until indexed
    first = pixels[torch.tensor([5, 2])]
    assert first.dtype == torch.uint8 and first.shape == (2, 3, 64, 64) and vae.decoded == 2
    mean = ds.latent.invert(ds.x0([5], stochastic=False))[0, :3, 0, 0]
    expect = (torch.tanh(mean) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert torch.equal(first[0, :, 0, 0], expect)

    feats = lambda x: x.mean((2, 3))  # noqa: E731  [B, 3] features of the resized images
    ref = reference_statistics(pixels, ds.fingerprint, num_images=24, extractor=feats, progress=False)
    assert ref.num_images == 24 and vae.decoded == 2 + 24
    order = torch.from_numpy(np.random.RandomState(0).permutation(96)[:24])
    np.testing.assert_allclose(ref.mu, feats(torch.nn.functional.interpolate(
        pixels[order].float(), size=299)).mean(0).numpy(), rtol=0.02)
    again = reference_statistics(ds.pixel_images(), ds.fingerprint, num_images=24, extractor=feats, progress=False)
    np.testing.assert_array_equal(again.mu, ref.mu)
    assert vae.decoded == 2 + 24 + 24  # only the interpolate check above decoded, the cached call nothing
