"""Per shared pair and region: the sampled max, the search witness, each single-pass method's
bound and time, and branch-and-bound's bound and gap ratio after short and long budgets.

    python scripts/bench_certify.py [--budgets 10 60] [--skip-alpha]
"""
import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe as dp
from diffprobe.graph import compose, fit_region

NETS = Path(__file__).resolve().parents[2] / "shared" / "nets"


def cases():
    load = lambda rel: dp.load_model(NETS / rel)
    acas_a, acas_b = load("acasxu/ACASXU_run2a_1_1_batch_2000.nnet"), load("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet")
    gen = torch.Generator().manual_seed(0)
    for i, centre in enumerate(torch.rand(2, 5, generator=gen, dtype=torch.float64) - 0.5):
        yield f"ACAS N_1_1 vs fp16, L-inf 0.01, centre {i}", acas_a, acas_b, dp.LinfBall(centre, 0.01)
    yield "ACAS N_1_1 vs fp16, property-1 box", acas_a, acas_b, dp.box_from_vnnlib(NETS / "acasxu/prop_1.vnnlib")
    mnist = torch.from_numpy(np.load(NETS / "mnist_3x100/mnist_test_inputs.npy")[0])
    yield ("MNIST 3x100 vs fp16, L-inf 8/255", load("mnist_3x100/mnist_relu_3_100.nnet"),
           load("mnist_3x100/mnist_relu_3_100_16bit.nnet"), dp.LinfBall(mnist, 8 / 255, (0, 1)))
    har = torch.from_numpy(np.load(NETS / "har/har_test_inputs.npy")[0])
    yield "HAR vs rounded, L-inf 0.1", load("har/HAR-trunc.onnx"), load("har/HAR-trunc-mirror.onnx"), dp.LinfBall(har, 0.1, (-1, 1))


def sampled_max(a, b, region, n=20000):
    pair = copy.deepcopy(compose(a, b, region)).double()
    x = fit_region(region, pair.input_shape).sample(n, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a, out_b = pair.outputs(x)
    return (out_b - out_a).abs().max().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", nargs="+", type=float, default=[10, 60])
    parser.add_argument("--skip-alpha", action="store_true")
    args = parser.parse_args()
    methods = ["ibp", "crown"] + ([] if args.skip_alpha else ["alpha-crown"]) + ["differential"] + (
        [] if args.skip_alpha else ["alpha-differential"])
    head = " | ".join(f"{m} bound (s)" for m in methods)
    bab = " | ".join(f"BaB {b:g}s bound (gap ratio)" for b in args.budgets)
    print(f"| pair / region | sampled | found | {head} | {bab} |")
    print("|" + "---|" * (3 + len(methods) + len(args.budgets)))
    for name, a, b, region in cases():
        cells = []
        found = 0.0
        for m in methods:
            t0 = time.perf_counter()
            cert = dp.certify(a, b, region, method=m, search_steps=100, arithmetic="exact")
            found = max(found, cert.found)
            cells.append(f"{cert.bound:.3g} ({time.perf_counter() - t0:.2f})")
        for budget in args.budgets:
            cert = dp.certify(a, b, region, method="auto", time_budget=budget, search_steps=100,
                              arithmetic="exact")
            found = max(found, cert.found)
            cells.append(f"{cert.bound:.3g} ({cert.gap_ratio:.3g})")
        print(f"| {name} | {sampled_max(a, b, region):.3g} | {found:.3g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
