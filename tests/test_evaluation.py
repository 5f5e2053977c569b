"""`edm-opt evaluate` / `sample` and FID during training, on tiny real runs.

A small deterministic TorchScript network with Inception's file layout (`.layers`, [B, 3, 299, 299] ->
2048 features) stands in for the real weights, passed exactly as they are (`--inception`,
`EDM_OPT_INCEPTION`); tests/test_metrics.py checks the real Inception network.
"""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import EDM_OPT, TINY as TINY_OPTIONS, cli_args
from edm_opt.evaluation import EvaluationError, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
TINY = cli_args({**TINY_OPTIONS, "status_every": 256, "snapshot_every": 256, "checkpoint_every": 512,
                 "schedule": "edm2"})


class _Layout(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 8, stride=8), torch.nn.Tanh(),
                                 torch.nn.AdaptiveAvgPool2d(8)).eval()  # 32 x 8 x 8 = 2048 features
    path = tmp_path_factory.mktemp("inception") / "stand-in.pt"
    torch.jit.script(_Layout(layers)).save(str(path))
    return path


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "run.json").read_text())
    c = MlflowClient(info["tracking_uri"])
    return c, c.get_run(info["mlflow_run_id"])


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    for bad in ("a-b", "5-2", ""):
        with pytest.raises(EvaluationError):
            parse_seeds(bad)


def test_evaluate_from_another_directory_logs_into_the_run(trained, stand_in, tmp_path, monkeypatch):
    monkeypatch.delenv("EDM_OPT_INCEPTION", raising=False)
    p = subprocess.run([EDM_OPT, "evaluate", str(trained), "--num-images", "16", "--ref-images", "64", "--steps", "4",
                        "--repeats", "2", "--inception", str(stand_in), "--batch", "16"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "about" in p.stdout and "min" in p.stdout  # the up-front time estimate
    assert not (tmp_path / "mlflow.db").exists()  # logged to the run's own store, not the cwd
    c, r = mlflow_run(trained)
    hist = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "fid")}
    m = r.data.metrics
    assert list(hist) == [512] and hist[512] == m["fid"]
    # the same numbers from the pieces: the snapshot's images for seeds 0-15 and 16-31, the stand-in's features,
    # the 64-image reference
    from edm_opt.data import load_dataset
    from edm_opt.loading import load_snapshot_network
    from edm_opt.metrics import extract_features, kid_from_features, load_inception, reference_statistics
    from edm_opt.sampling import generate

    extractor, _ = load_inception(stand_in)
    digits = load_dataset("digits")
    ref = reference_statistics(digits.images, digits.fingerprint, 64, extractor=extractor, progress=False)
    net = load_snapshot_network(trained / "snapshot-000000512.pt").net
    for i in range(2):
        images, _ = generate(net, range(16 * i, 16 * (i + 1)), batch_size=16, num_steps=4)
        feats = extract_features(images, extractor, batch_size=16)
        assert m[f"fid/repeat_{i}"] == pytest.approx(ref.fid(feats), rel=1e-6)
        assert m[f"kid/repeat_{i}"] == pytest.approx(kid_from_features(feats, ref.features)[0], rel=1e-6, abs=1e-12)
    assert m["fid/num_images"] == 16 and m["fid"] == min(m["fid/repeat_0"], m["fid/repeat_1"])
    assert m["fid/repeat_0"] != m["fid/repeat_1"]  # disjoint seed blocks
    assert m["kid"] == min(m["kid/repeat_0"], m["kid/repeat_1"])
    assert r.data.tags["edm_opt.fid_weights_sha256"] == hashlib.sha256(stand_in.read_bytes()).hexdigest()
    # --snapshot best picks the snapshot with the lowest FID logged (only 512 has one)
    p = subprocess.run([EDM_OPT, "evaluate", str(trained), "--snapshot", "best", "--num-images", "8",
                        "--ref-images", "64", "--steps", "4", "--inception", str(stand_in)],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "snapshot-000000512.pt" in p.stdout, p.stderr[-2000:]


def test_guided_evaluate_logs_its_own_keys(trained, stand_in, tmp_path):
    """Autoguidance of the 512-image snapshot by the 256-image one: fid/guidance_2 and kid/guidance_2, the FID of
    the guided sampler's images; --guidance without --gnet is one clear message."""
    gnet = trained / "snapshot-000000256.pt"
    p = subprocess.run([EDM_OPT, "evaluate", str(trained), "--num-images", "16", "--ref-images", "64", "--steps", "4",
                        "--inception", str(stand_in), "--batch", "16", "--guidance", "2", "--gnet", str(gnet)],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "guidance 2 by" in p.stdout and "logged fid/guidance_2=" in p.stdout
    c, r = mlflow_run(trained)
    m = r.data.metrics
    from edm_opt.data import load_dataset
    from edm_opt.loading import load_snapshot_network
    from edm_opt.metrics import extract_features, load_inception, reference_statistics
    from edm_opt.sampling import Guided, generate

    extractor, _ = load_inception(stand_in)
    digits = load_dataset("digits")
    ref = reference_statistics(digits.images, digits.fingerprint, 64, extractor=extractor, progress=False)
    net = Guided(load_snapshot_network(trained / "snapshot-000000512.pt").net, load_snapshot_network(gnet).net, 2.0)
    images, _ = generate(net, range(16), batch_size=16, num_steps=4)
    assert m["fid/guidance_2"] == pytest.approx(ref.fid(extract_features(images, extractor, batch_size=16)), rel=1e-6)
    assert "kid/guidance_2" in m and r.data.tags["edm_opt.gnet"] == str(gnet)
    p = subprocess.run([EDM_OPT, "evaluate", str(trained), "--num-images", "8", "--guidance", "2"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "--gnet" in p.stderr and "Traceback" not in p.stderr


def test_evaluate_refuses_changed_data(trained, stand_in, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for f in trained.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    info = json.loads((copy / "run.json").read_text())
    info["data"]["fingerprint"] = "0" * 64
    (copy / "run.json").write_text(json.dumps(info))
    p = subprocess.run([EDM_OPT, "evaluate", str(copy), "--num-images", "8", "--inception", str(stand_in)],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "run.json" in p.stderr and "fingerprint" in p.stderr
    assert "Traceback" not in p.stderr


def test_sample_grid(trained, tmp_path):
    p = subprocess.run([EDM_OPT, "sample", str(trained), "--seeds", "0-8", "--steps", "4", "--out", "g.png"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    from PIL import Image

    with Image.open(tmp_path / "g.png") as im:
        assert im.size[0] == im.size[1] > 3 * 64  # 3 x 3 grid of upscaled 8 x 8 images


def test_fid_during_training(stand_in, tmp_path):
    p = subprocess.run([EDM_OPT, "train"] + TINY + ["--fid-every", "256", "--fid-images", "8", "--fid-ref-images", "32"],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={**__import__("os").environ, "EDM_OPT_INCEPTION": str(stand_in)})
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = list((tmp_path / "runs" / "edm-opt").iterdir())
    c, r = mlflow_run(run)
    assert [m.step for m in c.get_metric_history(r.info.run_id, "fid")] == [256, 512]
    assert [m.step for m in c.get_metric_history(r.info.run_id, "kid")] == [256, 512]
