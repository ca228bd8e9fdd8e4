"""Certified drift of deployed copies in their own arithmetic: the digits MLP (64-64-32-10) and a
small digits CNN, each against its fp16, bf16, int8-dynamic (torch.ao, Linear layers) and
int8-static (torch.ao, every layer) copy, on L-inf balls of radius 0.02 around test images,
clipped to [0, 1]; then certified drift of the MLP's int8-dynamic copy over 1,000 points.

    python scripts/bench_deployed.py [--balls N] [--points N] [--thresholds T ...] [--docs]

Per pair, medians over the balls of: the search's witness on the deployed modules, the largest
difference found by sampling 2,000 points plus a 50-step PGD of the benchmark's own (gradients of
the exact models, values of the deployed ones), the certified bound in `native` arithmetic (what
runs) and in `exact` arithmetic (the stored weights in real arithmetic: what the verification
literature certifies, and what the deployed module exceeds), the ratio native bound / native
witness (the larger of search and sampling), and seconds per native certificate.
"""
import argparse
import statistics
import time

import torch

import diffprobe as dp
from diffprobe_examples.deployed import KINDS, deployed_copy, digits_classifier, digits_cnn, native_max

EPS = 0.02
ELEMENTWISE = dp.get_difference("elementwise")


def ball_row(model, copy_, center):
    region = dp.LinfBall(center.double(), EPS, (0.0, 1.0))
    witness = dp.search(model, copy_, region).found
    reached = native_max(model, copy_, region, ELEMENTWISE, n=2000, steps=50)
    t0 = time.perf_counter()
    native = dp.certify(model, copy_, region)
    seconds = time.perf_counter() - t0
    exact = dp.certify(model, copy_, region, arithmetic="exact")
    assert max(witness, reached) <= native.bound, "unsound: a deployed module exceeds its certificate"
    return witness, reached, native.bound, exact.bound, native.bound / max(witness, reached), seconds


def pairs():
    for name, (model, x_test) in (("digits MLP", digits_classifier()), ("digits CNN", digits_cnn())):
        for kind in KINDS:
            yield name, kind, model, deployed_copy(model, kind, x_test[:200].float()), x_test


def drift_row(points, threshold):
    """Drift of the MLP's int8-dynamic copy over `points` test images (and copies shifted by a pixel)."""
    model, x_test = digits_classifier()
    copy_ = deployed_copy(model, "int8-dynamic")
    x = torch.cat([x_test, torch.roll(x_test.reshape(-1, 8, 8), 1, dims=2).reshape(-1, 64)])[:points].double()
    t0 = time.perf_counter()
    report = dp.drift(model, copy_, x, eps=EPS, clip=(0.0, 1.0), threshold=threshold, chunk_size=250)
    return report, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", action="store_true", help="also rewrite the tables in docs/benchmarks.md")
    parser.add_argument("--balls", type=int, default=5)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[3.0, 0.5])
    args = parser.parse_args()
    balls = [emit("| pair | native witness (search) | native sampled + PGD | native bound | exact bound | "
                  "native bound / native witness | seconds |"), emit("|---|---|---|---|---|---|---|")]
    for name, kind, model, copy_, x_test in pairs():
        rows = [ball_row(model, copy_, x_test[i]) for i in range(args.balls)]
        med = [statistics.median(column) for column in zip(*rows)]
        balls.append(emit(f"| {name} vs {kind} | {med[0]:.3g} | {med[1]:.3g} | {med[2]:.3g} | {med[3]:.3g} | "
                          f"{med[4]:.2f} | {med[5]:.2f} |"))
    drift = [emit("\n| drift, digits MLP vs int8-dynamic | points | threshold | seconds | verified | falsified | "
                  "unknown | worst bound | worst found |"), emit("|---|---|---|---|---|---|---|---|---|")]
    for threshold in args.thresholds:  # one the bounds meet; one that leaves most points to the search
        report, seconds = drift_row(args.points, threshold)
        c = report.counts
        drift.append(emit(f"| L-inf {EPS} | {len(report.points)} | {threshold} | {seconds:.1f} | {c['verified']} | "
                          f"{c['falsified']} | {c['unknown']} | {report.bound:.3g} | {report.found:.3g} |"))
    if args.docs:
        from docs_section import update_section
        update_section("docs/benchmarks.md", "bench_deployed", "\n".join(balls))
        update_section("docs/benchmarks.md", "bench_deployed_drift", "\n".join(drift))


def emit(line):
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
