"""Tightness of certified difference bounds on the shared pairs: composed CROWN / alpha-CROWN
(auto_LiRPA on model_b(x) - model_a(x)) vs the differential method and its alpha version, beside
the sampled max; in exact arithmetic on the stored weights, as the published references are.

    python scripts/bench_tightness.py [--quick]

Prints a markdown table; ratios are measured in the same run (alpha-CROWN / the better differential
bound, differential time / CROWN time, alpha-differential time / alpha-CROWN time).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe as dp
from diffprobe.bounds import build_problem, differential_engine
from diffprobe.certification import _bounds as bounds_of  # one method's bounds, widened by rounding margins
from diffprobe.errors import UnsupportedOperationError
from diffprobe.deployment import deploy
from diffprobe.graph import fit_region
from diffprobe.layers import Network
from diffprobe_examples.pruning import prune_neurons

NETS = Path(__file__).resolve().parents[2] / "shared" / "nets"


def net(rel):
    return dp.load_model(NETS / rel)


def copy_with(model, fn):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(fn(p))
    return other


def _seconds(method, *args):
    t0 = time.perf_counter()
    method(*args)
    return time.perf_counter() - t0


def measure(a, b, region, methods, arithmetic="exact"):
    # exact arithmetic on the stored weights (the semantics of the published reference values),
    # or "native": each model as it runs (composed methods widened by its rounding margin)
    deployment = deploy(a, b, [region], arithmetic)
    pair = deployment.pair
    region = fit_region(region, pair.input_shape)
    problem = build_problem(deployment, "elementwise")
    differential_engine(problem)  # built once per problem, like the traced module: not timed
    lo, hi = (t.unsqueeze(0) for t in region.bounding_box())
    out = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            lower, upper = bounds_of(problem, m, region, lo, hi)
        except UnsupportedOperationError as exc:
            print(f"  {m}: {exc}", file=sys.stderr)
            out[m] = (float("inf"), float("nan"))
            continue
        seconds = time.perf_counter() - t0
        if m in ("crown", "differential"):  # compared: the median of 5 calls after this first one
            seconds = statistics.median(_seconds(bounds_of, problem, m, region, lo, hi) for _ in range(5))
        print(f"  {m}: {seconds:.3f}s", file=sys.stderr, flush=True)
        out[m] = (torch.maximum(-lower, upper).max().item(), seconds)
    x = region.sample(20000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a_out, b_out = pair.outputs(x)
    sampled = (b_out - a_out).abs().max().item()
    found = dp.search(a, b, region, steps=100, restarts=8, arithmetic=arithmetic).found
    for m, (bound, _) in out.items():
        assert bound >= max(sampled, found) - 1e-12, f"unsound {m}: {bound} < {max(sampled, found)}"
    out["sampled"] = max(sampled, found)
    return out


def cases(quick):
    mnist_a, mnist_b = net("mnist_3x100/mnist_relu_3_100.nnet"), net("mnist_3x100/mnist_relu_3_100_16bit.nnet")
    image0 = torch.from_numpy(np.load(NETS / "mnist_3x100/mnist_test_inputs.npy")[0])
    for eps, name in [(1 / 255, "1/255"), (3 / 255, "3/255"), (8 / 255, "8/255")]:
        yield f"MNIST 3x100 vs fp16, image 0, L-inf {name}", mnist_a, mnist_b, [dp.LinfBall(image0, eps, (0, 1))]
    har_a, har_b = net("har/HAR-trunc.onnx"), net("har/HAR-trunc-mirror.onnx")
    har0 = torch.from_numpy(np.load(NETS / "har/har_test_inputs.npy")[0])
    for eps in (0.01, 0.1):
        yield f"HAR vs 4-digit rounding, input 0, L-inf {eps}", har_a, har_b, [dp.LinfBall(har0, eps, (-1, 1))]
    acas_a = net("acasxu/ACASXU_run2a_1_1_batch_2000.nnet")
    acas_b = net("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet")
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(3 if quick else 7, 5, generator=gen, dtype=torch.float64) - 0.5
    for r in (0.05, 0.01):
        yield f"ACAS N_1_1 vs fp16, box radius {r} (median of {len(centres)})", acas_a, acas_b, [dp.LinfBall(c, r) for c in centres]
    yield "ACAS N_1_1 vs fp16, property-1 box", acas_a, acas_b, [dp.box_from_vnnlib(NETS / "acasxu/prop_1.vnnlib")]
    fc = net("mnistfc/mnist-net_256x2.onnx")
    fp16 = copy_with(fc, lambda p: p.half().float())
    noisy_gen = torch.Generator().manual_seed(0)
    noisy = copy_with(fc, lambda p: p * (1 + 0.01 * torch.randn(p.shape, generator=noisy_gen)))
    for eps in (0.01, 0.03):
        yield f"mnistfc 256x2 vs fp16, L-inf {eps}", fc, fp16, [dp.LinfBall(image0, eps, (0, 1))]
    for eps in (0.01, 0.03):
        yield f"mnistfc 256x2 vs W(1+0.01N), L-inf {eps}", fc, noisy, [dp.LinfBall(image0, eps, (0, 1))]
    half = prune_neurons(fc, 0.5)
    for eps in (0.01, 0.03):
        yield f"mnistfc 256x2 vs half its neurons pruned, L-inf {eps}", fc, half, [dp.LinfBall(image0, eps, (0, 1))]
    cnn = random_cnn()
    for eps in (0.01, 0.05):
        yield (f"random CNN (conv-BN-ReLU-conv-ReLU-avgpool-linear) vs fp16, L-inf {eps}", cnn,
               copy_with(cnn, lambda p: p.half().float()), [dp.LinfBall(image0, eps, (0, 1))])
    yield from digits_cases(quick)


def int8_weights(p):
    """Weights rounded to a symmetric per-output-channel int8 grid (biases kept)."""
    if p.dim() < 2:
        return p
    scale = p.abs().flatten(1).amax(1).clamp_min(1e-12).reshape(-1, *[1] * (p.dim() - 1)) / 127
    return (p / scale).round().clamp(-127, 127) * scale


def digits_cases(quick):
    """A residual CNN and a GELU MLP trained on the digits in seconds, vs their fp16 and int8 weight
    copies (exact arithmetic) and vs model.half() as it runs (native)."""
    from diffprobe_examples.demo import digits_data
    from diffprobe_examples.zoo import _trained, residual_cnn
    torch.manual_seed(0)
    images = digits_data(0)[2][:2 if quick else 5]
    resnet = _trained(residual_cnn()).eval()
    gelu = _trained(Network([torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                             torch.nn.Linear(32, 10)], (64,))).eval()
    for name, model in (("residual CNN (conv-BN-ReLU, basic block, avgpool)", resnet), ("GELU MLP 64-32-32-10", gelu)):
        regions = [dp.LinfBall(x.reshape(model.input_shape).double(), 0.01, (0, 1)) for x in images]
        suffix = f"digits, L-inf 0.01 (median of {len(regions)} images)"
        yield f"{name} vs fp16 weights, {suffix}", model, copy_with(model, lambda p: p.half().float()), regions
        yield f"{name} vs int8 weights, {suffix}", model, copy_with(model, int8_weights), regions
        yield (f"{name} vs model.half() as it runs, {suffix}", model, copy.deepcopy(model).half(), regions,
               "native")


def random_cnn():
    torch.manual_seed(0)
    net = Network([torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                   torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                   torch.nn.Flatten(), torch.nn.Linear(72, 10)], (1, 28, 28)).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer ACAS centres and digits images")
    parser.add_argument("--match", default="", help="only the rows whose name contains this")
    parser.add_argument("--docs", metavar="SECTION", help="also write the table into this marked section of "
                        "docs/benchmarks.md (e.g. bench_tightness_digits with --match digits)")
    args = parser.parse_args()
    if not NETS.exists():
        sys.exit(f"shared networks not found at {NETS}")
    methods = ["crown", "alpha-crown", "differential", "alpha-differential"]
    lines = ["| pair / region | sampled/found max | composed CROWN | composed alpha-CROWN | differential "
             "| alpha-differential | alpha-CROWN / best differential | time differential / CROWN "
             "| time alpha-differential / alpha-CROWN |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name, a, b, regions, *arithmetic in cases(args.quick):
        if args.match not in name:
            continue
        runs = [measure(a, b, r, methods, *arithmetic) for r in regions]
        med = lambda key, i=0: statistics.median(run[key][i] if i is not None else run[key] for run in runs)
        sampled = statistics.median(run["sampled"] for run in runs)
        crown, alpha, diff, alpha_diff = (med(m) for m in methods)
        t_ratio = med("differential", 1) / med("crown", 1)
        t_alpha = med("alpha-differential", 1) / med("alpha-crown", 1)
        lines.append(f"| {name} | {sampled:.3g} | {crown:.3g} | {alpha:.3g} | {diff:.3g} | {alpha_diff:.3g} "
                     f"| {alpha / min(diff, alpha_diff):.3g}x | {t_ratio:.2f} | {t_alpha:.2f} |")
        print(lines[-1], flush=True)
    if args.docs:
        from docs_section import update_section
        update_section("docs/benchmarks.md", args.docs, "\n".join(lines))


if __name__ == "__main__":
    main()
