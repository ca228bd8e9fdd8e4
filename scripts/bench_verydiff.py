"""VeryDiff's pairs, built from the shared nets (5 % of each layer's weights pruned by magnitude, no
retraining): ACAS Xu N_1_1 on property 1 (epsilon-equivalence, eps 0.05), and MNIST 3x100 on regions
where 15 pixels of a test image are free in [0, 1] (top-1 and delta-top-1 equivalence, delta 0.9).
Each row: diffprobe's `auto` (the differential engine where the structures match) against composed
alpha-CROWN on the same box, with the same time budget, in one run.

    python scripts/bench_verydiff.py [--budget 60] [--images 5] [--docs]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import diffprobe as dp
from diffprobe.differences import top1_where_confident
from diffprobe_examples.pruning import magnitude_pruned

ROOT = Path(__file__).resolve().parents[1]
NETS = ROOT.parent / "shared" / "nets"


def free_pixels(image, count=15):
    """The box where `count` mid-intensity-ranked pixels of `image` are free in [0, 1]."""
    free = image.argsort()[300:300 + count]
    lo, hi = image.clone(), image.clone()
    lo[free], hi[free] = 0.0, 1.0
    return dp.Box(lo, hi)


def row(name, a, b, region, difference, threshold, budget):
    cells = [name]
    for method in ("auto", "alpha-crown"):
        t0 = time.perf_counter()
        cert = dp.certify(a, b, region, difference=difference, method=method, threshold=threshold,
                          time_budget=budget)
        verdict = cert.verdict.value if cert.verdict else "-"
        cells += [verdict, f"{cert.bound:.3g}", f"{time.perf_counter() - t0:.1f}"]
    cells.insert(1, f"{cert.found:.3g}")
    line = "| " + " | ".join(cells) + " |"
    print(line, flush=True)
    return line


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--docs", action="store_true", help="also rewrite the table in docs/benchmarks.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    lines = ["| pair, property | witness | auto: verdict | bound | s | alpha-CROWN: verdict | bound | s |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    acas = dp.load_model(NETS / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx")
    box = dp.Box(torch.tensor([0.6, -0.5, -0.5, 0.45, -0.5]), torch.tensor([0.679857769, 0.5, 0.5, 0.5, -0.45]))
    lines.append(row("ACAS N_1_1 vs 5 %-pruned, property 1, eps 0.05", acas, magnitude_pruned(acas, 0.05), box,
                     "elementwise", 0.05, args.budget))
    mnist = dp.load_model(NETS / "mnist_3x100" / "mnist_relu_3_100.nnet")
    pruned = magnitude_pruned(mnist, 0.05)
    images = torch.tensor(np.load(NETS / "mnist_3x100" / "mnist_test_inputs.npy"), dtype=torch.float64)
    for i in range(args.images):
        region = free_pixels(images[i])
        lines.append(row(f"MNIST 3x100 vs 5 %-pruned, image {i}, 15 free pixels, top-1", mnist, pruned, region,
                         "top1", 0.0, args.budget))
        lines.append(row(f"... same, delta-top-1 (delta 0.9)", mnist, pruned, region, top1_where_confident(0.9),
                         0.0, args.budget))
    if args.docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from docs_section import update_section
        update_section("docs/benchmarks.md", "bench_verydiff", "\n".join(lines))


if __name__ == "__main__":
    main()
