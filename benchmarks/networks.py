"""Network training-step throughput: forward + backward images/s, measured side by side in one run.

CPU: `edm2-mini` at batch 64, fp32, on 8x8x1 (digits-like) and 32x32x1 input; channels-last; one thread.
CUDA (when available): `edm2-img64-s` in fp32, TF32, bf16 and fp16 autocast, the official float16 body
(`use_fp16=True`), channels-last and torch.compile. Prints measured numbers and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from edm_opt.compute import flops_per_image
from edm_opt.networks import build_network


def training_step(net, x, sigma, labels, autocast_dtype):
    """One EDM2-style loss forward + backward (err^2 / exp(u) + u), gradients cleared first."""
    net.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        D, u = net(x, sigma, labels, return_logvar=True)
        loss = ((D.float() - x).square() / u.float().exp() + u.float()).mean()
    loss.backward()


def images_per_second(net, x, sigma, labels, autocast_dtype=None, warmup=2, min_time=3.0):
    """Median-free throughput: steps after warm-up, timed until `min_time` seconds have passed."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        training_step(net, x, sigma, labels, autocast_dtype)
    sync()
    steps, t0 = 0, time.perf_counter()
    while True:
        training_step(net, x, sigma, labels, autocast_dtype)
        steps += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and steps >= 3:
            return steps * x.shape[0] / elapsed


def inputs(batch, channels, resolution, label_dim, device, channels_last=False):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, channels, resolution, resolution, device=device, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sigma = (torch.randn(batch, device=device, generator=g) * 1.6 - 0.8).exp()
    labels = torch.eye(label_dim, device=device)[torch.arange(batch, device=device) % label_dim] if label_dim else None
    return x, sigma, labels


def cpu_benchmark(batch: int, min_time: float):
    threads = torch.get_num_threads()
    print(f"== CPU, {threads} threads, edm2-mini, batch {batch}, fp32, train mode")
    base = {}
    for R in (8, 32):
        torch.manual_seed(0)
        net = build_network("edm2-mini", img_resolution=R, img_channels=1).train()
        flops = flops_per_image(net, R, 1, 0)
        x, sigma, labels = inputs(batch, 1, R, 0, "cpu")
        base[R] = images_per_second(net, x, sigma, labels, min_time=min_time)
        print(f"  {R}x{R}x1: {base[R]:8.1f} img/s   ({flops / 1e9:.3f} GFLOP/img fwd+bwd, "
              f"{base[R] * flops / 1e9:.1f} GFLOP/s)")
        x, sigma, labels = inputs(batch, 1, R, 0, "cpu", channels_last=True)
        cl = images_per_second(net.to(memory_format=torch.channels_last), x, sigma, labels, min_time=min_time)
        print(f"  {R}x{R}x1 channels-last: {cl:8.1f} img/s   (x{cl / base[R]:.2f} of contiguous)")
        if threads > 1:
            torch.set_num_threads(1)
            x, sigma, labels = inputs(batch, 1, R, 0, "cpu")
            one = images_per_second(net.to(memory_format=torch.contiguous_format), x, sigma, labels,
                                    min_time=min_time)
            torch.set_num_threads(threads)
            print(f"  {R}x{R}x1 one thread: {one:8.1f} img/s   (x{one / base[R]:.2f} of {threads} threads)")
    print(f"  ratio 8x8 / 32x32 throughput: {base[8] / base[32]:.1f} (pixel ratio 16)")


def cuda_benchmark(batch: int, min_time: float):
    name = torch.cuda.get_device_name()
    print(f"== CUDA ({name}), edm2-img64-s (280 M parameters, 3x64x64, 1000 classes), batch {batch}")
    torch.backends.cudnn.benchmark = True
    results = {}

    def run(label, autocast_dtype=None, tf32=False, channels_last=False, compile=False, use_fp16=False):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(0)
        net = build_network("edm2-img64-s", device="cuda", use_fp16=use_fp16).train()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if compile:
            net = torch.compile(net)
        x, sigma, labels = inputs(batch, 3, 64, 1000, "cuda", channels_last=channels_last)
        try:
            results[label] = images_per_second(net, x, sigma, labels, autocast_dtype, warmup=3 if compile else 2,
                                               min_time=min_time)
        except Exception as e:  # report and go on: a failed variant is a result too
            print(f"  {label:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            return
        ratio = results[label] / results.get("fp32", results[label])
        print(f"  {label:34s} {results[label]:8.1f} img/s   (x{ratio:.2f} of fp32)")
        del net
        torch.cuda.empty_cache()

    run("fp32")
    run("fp32 + TF32", tf32=True)
    run("official float16 body (use_fp16)", use_fp16=True)
    run("bf16 autocast", torch.bfloat16)
    run("fp16 autocast", torch.float16)
    run("bf16 autocast + channels-last", torch.bfloat16, channels_last=True)
    run("bf16 autocast + torch.compile", torch.bfloat16, compile=True)
    run("bf16 autocast + channels-last + compile", torch.bfloat16, channels_last=True, compile=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds timed per variant")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_benchmark(args.batch, args.min_time)
    if torch.cuda.is_available():
        cuda_benchmark(args.batch, args.min_time)
    else:
        print("== CUDA not available: GPU variants skipped")


if __name__ == "__main__":
    main()
