"""VNN-COMP 2026 `isomorphic_acasxu`-style instances built from the shared ACAS nets: model_b =
model_a with N(0, 1e-3) noise on every parameter (seeded); region x0 in [0.6, 0.6799], x1, x2 in
[-0.5, 0.5], x3 in [0.45, 0.5], x4 = -0.45; property |Y_b - Y_a| <= 0.05 on every output.

    python scripts/bench_isomorphic.py [--nets 1_1 1_2 ...] [--budget 120]
"""
import argparse
from pathlib import Path

import torch

import diffprobe as dp
from diffprobe_examples.networks import noisy_copy

NETS = Path(__file__).resolve().parents[2] / "shared" / "nets"


def noisy(model, seed, sigma=1e-3):
    return noisy_copy(model, sigma, seed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nets", nargs="+", default=["1_1", "1_5", "1_9"])
    parser.add_argument("--budget", type=float, default=120)
    args = parser.parse_args()
    region = dp.Box(torch.tensor([0.6, -0.5, -0.5, 0.45, -0.45]), torch.tensor([0.6799, 0.5, 0.5, 0.5, -0.45]))
    print("| instance | verdict | found | bound | branches | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.nets:
        a = dp.load_model(NETS / f"acasxu/ACASXU_run2a_{name}_batch_2000.onnx")
        cert = dp.certify(a, noisy(a, seed=0), region, threshold=0.05, time_budget=args.budget,
                          arithmetic="exact")
        print(f"| N_{name} + N(0, 1e-3) | {cert.verdict.value} | {cert.found:.3g} | {cert.bound:.3g} "
              f"| {cert.branches} | {cert.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
