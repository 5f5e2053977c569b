"""FID and KID of a run's snapshots, logged into the run's own MLflow run (`edm-opt evaluate`).

Images come from the EMA snapshot with EDM2's Heun sampler and per-sample seeds, so a sample does not
depend on the batch size or the number of ranks; under torchrun every rank generates and embeds a strided
share of the seeds and rank 0 gathers the Inception features. FID and KID compare them with the cached
reference statistics of the run's training data (`edm_opt.metrics`, clean-fid's "clean" protocol).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from . import EdmOptError
from . import contract as C
from . import distributed as D
from .data import DataSpec
from .latents import pixel_decoder, snapshot_scaling
from .loading import load_model, load_snapshot_network
from .metrics import extract_features, load_inception, reference_statistics
from .plots import save_image_grid
from .rundir import RunDir
from .sampling import generate, guided
from .tracking import log_now, metric_history
from .progress import progress as progress_bar


class EvaluationError(EdmOptError, ValueError):
    """A run directory, snapshot or seed range that cannot be evaluated."""


def parse_seeds(spec: str) -> list[int]:
    """'0-49999', '0,5,10-19' -> a list of seeds (ranges inclusive)."""
    seeds = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise EvaluationError(f"cannot parse seeds {spec!r}: use e.g. 0-49999 or 0,3,10-19")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise EvaluationError(f"seed range {part!r} is empty")
        seeds.extend(range(lo, hi + 1))
    return seeds


def select_snapshot(run, which: str, uri: str | None = None, run_id: str | None = None) -> tuple[int, Path]:
    """`latest`, an image count, or `best` (the lowest FID logged for the run)."""
    if which != "best":
        return run.snapshot_path(which)

    history = metric_history(uri, run_id, C.FID) if uri and run_id else []
    if not history:
        raise EvaluationError(f"{run.path}: --snapshot best needs FIDs logged for this run; evaluate some "
                              f"snapshots first (--snapshot latest or NIMG)")
    step, _ = min(history, key=lambda sv: sv[1])
    return run.snapshot_path(str(step))


def generate_features(net, seeds: list[int], extractor, env: D.DistEnv, steps: int = 32, batch: int = 64,
                      progress: bool = False, decode=None) -> np.ndarray | None:
    """Inception features of the images generated for `seeds` (rank 0: all, in seed order; others: None)."""
    mine = seeds[env.rank::env.world_size]
    chunks = []
    batches = range(0, len(mine), batch)
    if progress and env.is_main:
        batches = progress_bar(batches, desc="generate + embed", unit="batch")
    for i in batches:
        images, _ = generate(net, mine[i:i + batch], batch_size=batch, num_steps=steps, device=env.device,
                             decode=decode)
        chunks.append(extract_features(images, extractor, batch_size=batch, device=env.device))
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 2048), np.float32)
    parts = D.gather_objects(env, feats)
    if not env.is_main:
        return None
    out = np.empty((len(seeds), parts[0].shape[1] if len(parts[0]) else 2048), np.float32)
    for r, part in enumerate(parts):  # undo the strided split: rank r had seeds r, r + W, ...
        out[r::env.world_size] = part
    return out


def estimate_seconds(net, extractor, env: D.DistEnv, n_images: int, steps: int, batch: int, decode=None) -> float:
    """Time generating and embedding `n_images` will take, from a short probe on this device.

    The probe runs twice and times the second pass: TorchScript (the Inception network) optimises itself on
    its first calls, which would make a single probe several times too pessimistic.
    """
    probe = max(1, min(8, batch, n_images))
    for _ in range(2):
        t = time.perf_counter()
        images, _ = generate(net, range(10 ** 9, 10 ** 9 + probe), batch_size=probe, num_steps=steps,
                             device=env.device, decode=decode)
        t_gen = (time.perf_counter() - t) / probe
        t = time.perf_counter()
        extract_features(images, extractor, batch_size=probe, device=env.device)
        t_emb = (time.perf_counter() - t) / probe
    return (t_gen + t_emb) * n_images / max(env.world_size, 1)


def fid_kid(features: np.ndarray, ref) -> tuple[float, float]:
    kid, _ = ref.kid(features)
    return ref.fid(features), kid


def snapshot_file(run: RunDir, which: str, uri: str | None, run_id: str | None) -> Path:
    """`--snapshot`: latest, an image count, best, or a snapshot file (e.g. one of `edm-opt phema`'s)."""
    if str(which).endswith(".pt"):
        path = Path(which)
        if not path.is_file():
            raise EvaluationError(f"snapshot {path} not found")
        return path
    return select_snapshot(run, which, uri, run_id)[1]


def profile_label(snap: dict, ema: str | None) -> str | None:
    """The EMA profile in metric keys: None for the snapshot's default profile, else its name (`_posthoc` for a
    post-hoc EMA reconstruction)."""
    if "phema" in snap:
        return f"{snap['ema']}_posthoc"
    return None if ema in (None, snap.get("ema")) else ema


def guiding_network(gnet: str | None, device) -> torch.nn.Module | None:
    """`--gnet`: a run directory, snapshot or any model `edm-opt diagnose` reads, as an eval-mode denoiser."""
    if gnet is None:
        return None
    return load_model(gnet).net.eval().requires_grad_(False).to(device)


def evaluate_run(run_dir: str | Path, *, snapshot: str = "latest", num_images: int = 50000, seeds: str | None = None,
                 steps: int = 32, repeats: int = 1, ref_images: int | None = None, batch: int = 64,
                 device: str = "auto", inception: str | None = None, guidance: float = 1.0,
                 gnet: str | None = None, ema: str | None = None, echo=print) -> dict:
    """Generate from a snapshot, compute FID/KID against the run's data, log them into the run's MLflow run.

    `seeds` wins over `num_images`; with `repeats` R the seeds of repeat i are the i-th consecutive block of
    the same size (EDM's protocol: report the minimum; all values are logged). With `guidance` w != 1 the
    snapshot is guided by `gnet` (sampling.Guided) and the numbers are logged as `fid/guidance_<w>`,
    `kid/guidance_<w>`; `ema` picks another tracked EMA profile of the snapshot (`fid/ema_<profile>`), and
    `snapshot` may be a snapshot file, e.g. a post-hoc EMA one (`fid/ema_<profile>_posthoc`). Returns the numbers.
    """
    env = D.read_env(device)
    run = RunDir(run_dir)
    info = run.read_info()
    base = parse_seeds(seeds) if seeds else list(range(num_images))
    if repeats < 1 or not base:
        raise EvaluationError("--repeats must be >= 1 and the seed list non-empty")
    uri, run_id = info.tracking_uri, info.mlflow_run_id
    path = snapshot_file(run, snapshot, uri, run_id)
    spec = DataSpec.from_dict(info.data)
    dataset = spec.load()
    if dataset.fingerprint != info.data["fingerprint"]:
        raise EvaluationError(f"{run.info_path}: the run's data {spec.source} has changed (fingerprint "
                              f"{dataset.fingerprint[:16]}... now, {info.data['fingerprint'][:16]}... at training)")
    decode = pixel_decoder(dataset.latent, env.device)  # latents: FID needs pixels (LatentError without a VAE)
    D.init(env)
    try:
        snap = load_snapshot_network(path, env.device, ema)
        nimg = snap.nimg
        net = guided(snap.net, guiding_network(gnet, env.device), guidance)
        profile = profile_label(snap.meta, ema)
        extractor, sha = load_inception(inception, env.device)
        n_total = len(base) * repeats
        if env.is_main:
            est = estimate_seconds(net, extractor, env, n_total, steps, batch, decode)
            echo(f"evaluating {path.name} ({nimg:,} images seen): {n_total:,} generated images "
                 f"({repeats} x {len(base):,}), {steps} Heun steps"
                 + (f", guidance {guidance:g} by {gnet}" if guidance != 1 else "") +
                 f", {env.world_size} rank(s) on {env.device}; "
                 f"about {est / 60:.1f} min (plus reference statistics if not cached)")
        ref = None
        if env.is_main:
            n_ref = ref_images or min(dataset.num_images, 50000)
            ref = reference_statistics(dataset.pixel_images(env.device), dataset.fingerprint, num_images=n_ref,
                                       extractor=extractor, device=env.device, progress=True)
        D.barrier(env)
        width = (max(base) - min(base) + 1) if seeds else len(base)
        values = []
        for i in range(repeats):
            block = [s + i * width for s in base]
            feats = generate_features(net, block, extractor, env, steps, batch, progress=True, decode=decode)
            if env.is_main:
                values.append(fid_kid(feats, ref))
                echo(f"  repeat {i}: seeds {block[0]}-{block[-1]}: FID {values[-1][0]:.3f}  KID {values[-1][1]:.5f}")
    finally:
        D.shutdown()
    if not env.is_main:
        return {}
    fids, kids = [v[0] for v in values], [v[1] for v in values]
    fid_key, kid_key = C.fid_metric(C.FID, guidance, profile), C.fid_metric(C.KID, guidance, profile)
    metrics = {fid_key: min(fids), kid_key: min(kids), C.FID_NUM_IMAGES: len(base),
               C.FID_REF_IMAGES: ref.num_images, C.FID_STEPS: steps}
    if repeats > 1:
        metrics.update({f"fid/repeat_{i}": f for i, f in enumerate(fids)})
        metrics.update({f"kid/repeat_{i}": k for i, k in enumerate(kids)})
        metrics[C.FID_MEAN] = float(np.mean(fids))
    if uri and run_id:
        tags = {"edm_opt.fid_weights_sha256": sha, **({C.TAG_GNET: str(gnet)} if guidance != 1 else {})}
        log_now(uri, run_id, metrics, step=nimg, tags=tags)
        echo(f"logged {fid_key}={metrics[fid_key]:.3f} {kid_key}={metrics[kid_key]:.5f} at step {nimg} of MLflow "
             f"run {run_id} ({uri})")
    return {"nimg": nimg, "snapshot": str(path), "fids": fids, "kids": kids, **metrics, "weights_sha256": sha}


def sample_grid(run_dir: str | Path, seeds: str, out: str | Path, snapshot: str = "latest", steps: int = 32,
                class_label: int | None = None, device: str = "auto", guidance: float = 1.0,
                gnet: str | None = None, ema: str | None = None) -> Path:
    """`edm-opt sample`: a PNG grid of the images for `seeds` from a snapshot (guided by `gnet` if w != 1)."""
    env = D.read_env(device)
    path = snapshot_file(RunDir(run_dir), snapshot, None, None)
    snap = load_snapshot_network(path, env.device, ema)
    net = guided(snap.net, guiding_network(gnet, env.device), guidance)
    decode = pixel_decoder(snapshot_scaling(snap.meta), env.device)  # LatentError for latents without a VAE
    images, _ = generate(net, parse_seeds(seeds), num_steps=steps, device=env.device,
                         class_labels="random" if class_label is None else class_label, progress=True, decode=decode)
    return save_image_grid(images, out, columns=int(math.ceil(math.sqrt(len(images)))))


class TrainingFID:
    """FID/KID of snapshots during training (`--fid-every`): generation spread over all ranks."""

    def __init__(self, dataset, env: D.DistEnv, num_images: int, ref_images: int | None, steps: int = 32,
                 batch: int = 64):
        self.env, self.num_images, self.steps, self.batch = env, num_images, steps, batch
        self.decode = pixel_decoder(dataset.latent, env.device)  # LatentError: FID of latents needs the VAE
        self.extractor, self.sha = load_inception(None, env.device)
        self.ref = None
        if env.is_main:
            n_ref = ref_images or min(dataset.num_images, 50000)
            self.ref = reference_statistics(dataset.pixel_images(env.device), dataset.fingerprint, num_images=n_ref,
                                            extractor=self.extractor, device=env.device, progress=True)

    def __call__(self, net) -> dict | None:
        """{'fid', 'kid', 'fid/num_images'} on rank 0, None on the others."""
        with torch.random.fork_rng(devices=[self.env.device] if self.env.device.type == "cuda" else []):
            feats = generate_features(net, list(range(self.num_images)), self.extractor, self.env, self.steps,
                                      self.batch, decode=self.decode)
        if feats is None:
            return None
        fid, kid = fid_kid(feats, self.ref)
        return {C.FID: fid, C.KID: kid, C.FID_NUM_IMAGES: self.num_images, C.FID_REF_IMAGES: self.ref.num_images}
