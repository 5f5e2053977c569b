"""The `edm-opt` console script end to end, in real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edm_opt.diffusion import sigma_grid, sigma_key
from edm_opt.optimal_loss import OptimalLossTable

EDM_OPT = [str(Path(sys.executable).with_name("edm-opt"))]


def run(args, cwd, check=True):
    p = subprocess.run(EDM_OPT + args, cwd=cwd, capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_estimate_end_to_end_on_digits(tmp_path):
    args = ["estimate", "--data", "digits", "--sigmas", "0.002:80:8", "--num-samples", "600",
            "--out", "t.json", "--plot", "t.png"]
    p = run(args, tmp_path)
    t = json.loads((tmp_path / "t.json").read_text())
    table = OptimalLossTable.load(tmp_path / "t.json")
    assert f"sigma* = {sigma_key(table.sigma_star)}   reference total = {table.ref_total():.6g}" in p.stdout
    assert table.sigma_star == sigma_grid(0.002, 80, 8)[3]  # 0.188: digits' J* collapses below ~0.24 (method.md 4.1)
    assert "J*_LOO" in p.stdout and table.upper is not None  # J*_up columns by default
    assert t["estimator"] == "cdol" and len(t["jstar"]) == 8 and t["jstar"][0] < 1e-9
    assert np.isclose(t["jstar"][-1], 0.293, rtol=0.02)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    again = run(args, tmp_path)
    assert "cached at" in again.stderr and again.stdout == p.stdout


def test_data_info_and_convert(tmp_path):
    p = run(["data", "info", "digits", "--json"], tmp_path)
    info = json.loads(p.stdout)
    assert info["count"] == 1797 and info["shape"] == [1, 8, 8] and info["num_classes"] == 10
    run(["data", "convert", "digits", "--out", "d.zip"], tmp_path)
    back = json.loads(run(["data", "info", str(tmp_path / "d.zip"), "--json"], tmp_path).stdout)
    assert back["fingerprint"] == info["fingerprint"]  # same pixels, labels and preprocessing: same data
    run(["data", "convert", "digits", "--out", "p.zip", "--resolution", "12"], tmp_path)
    padded = json.loads(run(["data", "info", str(tmp_path / "p.zip"), "--json"], tmp_path).stdout)
    assert padded["shape"] == [1, 12, 12] and padded["count"] == 1797


def test_data_convert_holds_out_a_test_split(tmp_path):
    from edm_opt.data import load_dataset

    p = run(["data", "convert", "digits", "--out", "kept.zip", "--hold-out", "180", "--hold-out-to", "held.zip"],
            tmp_path)
    assert "180 held-out images" in p.stdout
    full, kept, held = (load_dataset(s) for s in ("digits", str(tmp_path / "kept.zip"), str(tmp_path / "held.zip")))
    assert (kept.num_images, held.num_images) == (1617, 180)
    counts = full.labels.bincount()
    assert (held.labels.bincount() - counts * 180 / 1797).abs().max() < 1  # in proportion to each class
    # a partition of the images: every image once, none in both parts (digits has a few duplicates: compare counts)
    rows = lambda d: [(bytes(im.numpy()), int(c)) for im, c in zip(d.images, d.labels)]
    assert sorted(rows(kept) + rows(held)) == sorted(rows(full))
    again = run(["data", "convert", "digits", "--out", "k2.zip", "--hold-out", "180", "--hold-out-to", "h2.zip"],
                tmp_path)
    assert again.stdout.replace("k2", "kept").replace("h2", "held") == p.stdout  # the seed fixes the draw
    p = run(["data", "convert", "digits", "--out", "x.zip", "--hold-out", "1797", "--hold-out-to", "y.zip"], tmp_path,
            check=False)
    assert p.returncode == 1 and "1797" in p.stderr and not (tmp_path / "x.zip").exists()
    p = run(["data", "convert", "digits", "--out", "x.zip", "--hold-out", "5"], tmp_path, check=False)
    assert p.returncode == 2 and "--hold-out-to" in p.stderr and not (tmp_path / "x.zip").exists()


def test_bad_input_is_one_clear_error(tmp_path):
    p = run(["estimate", "--data", str(tmp_path / "nope")], tmp_path, check=False)
    assert p.returncode == 1 and "nope" in p.stderr and "Traceback" not in p.stderr
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 4, 4), np.uint8))
    p = run(["estimate", "--data", "x.npz", "--class-conditional", "--out", "t.json"], tmp_path, check=False)
    assert p.returncode == 1 and "needs labels" in p.stderr and not (tmp_path / "t.json").exists()
    p = run(["estimate", "--data", "digits", "--sigmas", "2,1"], tmp_path, check=False)
    assert p.returncode == 2 and "--sigmas" in p.stderr
