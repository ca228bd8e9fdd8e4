"""Certified drift over 1,000 MNIST points: mnistfc 784-256-256-10 vs its fp16 copy and vs an
int8 (per-output-channel symmetric, dequantised) copy; L-inf eps 0.01 clipped to [0, 1],
threshold 0.05 on max |b - a|.

    python scripts/bench_drift.py [--points N] [--loop N]

`diffprobe.drift` (regions batched, cheapest method first, search and branch-and-bound only where
undecided) is timed beside a per-point loop of `diffprobe.certify` over the first --loop points,
measured in the same run; the ratio compares time per point. The 1,000 points are the 100 shared
MNIST test images and copies shifted by one or two pixels (no dataset can be downloaded here).
"""
import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe as dp

NETS = Path(__file__).resolve().parents[2] / "shared" / "nets"
EPS, THRESHOLD = 0.01, 0.05


def points(n):
    images = torch.from_numpy(np.load(NETS / "mnist_3x100/mnist_test_inputs.npy")).double().reshape(-1, 28, 28)
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1), (2, 0), (0, 2), (-2, 0)]
    out = torch.cat([torch.roll(images, s, dims=(1, 2)) for s in shifts])
    return out.reshape(-1, 784)[:n]


def copy_with(model, fn):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(fn(p) if name.endswith("weight") else p)
    return other


def int8(w):
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def run(a, b, x, loop):
    t0 = time.perf_counter()
    report = dp.drift(a, b, x, eps=EPS, clip=(0.0, 1.0), threshold=THRESHOLD, chunk_size=250)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    certs = [dp.certify(a, b, dp.LinfBall(p, EPS, (0.0, 1.0)), threshold=THRESHOLD) for p in x[:loop]]
    looped = time.perf_counter() - t0
    verified_loop = sum(c.verdict == dp.Verdict.VERIFIED for c in certs) / len(certs)
    return report, batched, looped, verified_loop


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--loop", type=int, default=100)
    args = parser.parse_args()
    a = dp.load_model(NETS / "mnistfc/mnist-net_256x2.onnx")
    x = points(args.points)
    print(f"| pair | points | drift s | verified | falsified | unknown | worst bound | verified, first {args.loop}: "
          f"drift / loop | loop s per point | speed-up per point |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, b in (("fp16", copy_with(a, lambda w: w.half().double())), ("int8", copy_with(a, int8))):
        report, batched, looped, verified_loop = run(a, b, x, args.loop)
        c, n = report.counts, len(report.points)
        per_pt, loop_pt = batched / n, looped / args.loop
        first = sum(p.verdict == dp.Verdict.VERIFIED for p in report.points[:args.loop]) / args.loop
        print(f"| mnistfc 256x2 vs {name} | {n} | {batched:.1f} | {c['verified'] / n:.3f} | {c['falsified']} | "
              f"{c['unknown']} | {report.bound:.3g} | {first:.3f} / {verified_loop:.3f} | {loop_pt:.3f} | "
              f"{loop_pt / per_pt:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
