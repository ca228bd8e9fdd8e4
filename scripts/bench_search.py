"""Disagreement search vs plain PGD vs uniform random sampling at an equal budget of model
evaluations (forward+backward passes per point), on the shared pairs and derived copies, and on
tiny pairs against the exact optimum of a MILP (scipy.optimize.milp, big-M encoding).

    python scripts/bench_search.py

Prints a markdown table of found values (medians over seeds 0, 1, 2 for every method) and the
ratios search / PGD, search / random and search / exact (tiny pairs only); the last rows are balls
the search was not developed on.
"""
import copy
import statistics
from pathlib import Path

import numpy as np
import torch

import diffprobe as dp
from diffprobe.differences import get_difference
from diffprobe.graph import compose, fit_region
from diffprobe_examples.networks import random_network

NETS = Path(__file__).resolve().parents[2] / "shared" / "nets"
STEPS, RESTARTS = 100, 8
SEEDS = (0, 1, 2)


def pgd(a, b, region, budget, seed, step=0.1):
    """Fixed-step sign/normalised gradient ascent, no momentum, from random starts."""
    pair = copy.deepcopy(compose(a, b, region)).double()
    region = fit_region(region, pair.input_shape)
    diff = get_difference("elementwise")
    x = region.sample(RESTARTS, torch.Generator().manual_seed(seed))
    lo, hi = region.bounding_box()
    best = torch.tensor(-1.0, dtype=torch.float64)
    for _ in range(budget // RESTARTS):
        x = x.detach().requires_grad_(True)
        values = diff(*pair.outputs(x))
        grad, = torch.autograd.grad(values.sum(), x)
        best = torch.maximum(best, values.max().detach())
        if region.norm == 2.0:
            direction = grad / grad.reshape(len(grad), -1).norm(dim=1).clamp_min(1e-30).reshape(-1, *[1] * (grad.dim() - 1))
            x = region.project(x + step * region.eps * direction)
        else:
            x = region.project(x + step * (hi - lo) / 2 * grad.sign())
    return best.item()


def random_max(a, b, region, budget, seed):
    pair = copy.deepcopy(compose(a, b, region)).double()
    region = fit_region(region, pair.input_shape)
    x = region.sample(budget, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return get_difference("elementwise")(*pair.outputs(x)).max().item()


def derived(model, kind, seed=0):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if kind == "int8":  # symmetric per-tensor quantisation
                scale = p.abs().max() / 127
                p.copy_(torch.round(p / scale) * scale)
            elif kind == "pruned":  # 20 % smallest weights set to zero
                if p.dim() > 1:
                    p.mul_(p.abs() > p.abs().flatten().kthvalue(int(0.2 * p.numel())).values)
            elif kind == "noise":
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=gen))
    return other


def cases():
    load = lambda rel: dp.load_model(NETS / rel)
    acas_a, acas_b = load("acasxu/ACASXU_run2a_1_1_batch_2000.nnet"), load("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet")
    yield "ACAS N_1_1 vs fp16, property-1 box", acas_a, acas_b, dp.box_from_vnnlib(NETS / "acasxu/prop_1.vnnlib")
    yield "ACAS N_1_1 vs fp16, L-inf 0.05 at 0", acas_a, acas_b, dp.LinfBall(torch.zeros(5), 0.05)
    mnist = torch.from_numpy(np.load(NETS / "mnist_3x100/mnist_test_inputs.npy")[0])
    m_a, m_b = load("mnist_3x100/mnist_relu_3_100.nnet"), load("mnist_3x100/mnist_relu_3_100_16bit.nnet")
    yield "MNIST 3x100 vs fp16, L-inf 3/255", m_a, m_b, dp.LinfBall(mnist, 3 / 255, (0, 1))
    yield "MNIST 3x100 vs fp16, L2 0.5", m_a, m_b, dp.L2Ball(mnist, 0.5, (0, 1))
    har = torch.from_numpy(np.load(NETS / "har/har_test_inputs.npy")[0])
    yield "HAR vs rounded, L-inf 0.1", load("har/HAR-trunc.onnx"), load("har/HAR-trunc-mirror.onnx"), dp.LinfBall(har, 0.1, (-1, 1))
    fc = load("mnistfc/mnist-net_256x2.onnx")
    for kind in ("int8", "pruned", "noise"):
        yield f"mnistfc 256x2 vs {kind}, L-inf 0.03", fc, derived(fc, kind), dp.LinfBall(mnist, 0.03, (0, 1))


def more_cases():
    """Balls the search was not developed on: other test points, radii and copies (seeds 1, 2 for
    the noise copies)."""
    load = lambda rel: dp.load_model(NETS / rel)
    images = np.load(NETS / "mnist_3x100/mnist_test_inputs.npy")
    har = np.load(NETS / "har/har_test_inputs.npy")
    image = lambda i: torch.from_numpy(images[i])
    m_a, m_b = load("mnist_3x100/mnist_relu_3_100.nnet"), load("mnist_3x100/mnist_relu_3_100_16bit.nnet")
    fc = load("mnistfc/mnist-net_256x2.onnx")
    h_a, h_b = load("har/HAR-trunc.onnx"), load("har/HAR-trunc-mirror.onnx")
    for i, eps in ((5, 0.3), (8, 0.3), (9, 0.5), (10, 1.0), (11, 0.5), (12, 0.3)):
        yield f"MNIST 3x100 vs fp16, L2 {eps}, image {i}", m_a, m_b, dp.L2Ball(image(i), eps, (0, 1))
    for i, eps in ((16, 2), (17, 5)):
        yield f"MNIST 3x100 vs fp16, L-inf {eps}/255, image {i}", m_a, m_b, dp.LinfBall(image(i), eps / 255, (0, 1))
    yield "mnistfc vs int8, L2 0.5, image 13", fc, derived(fc, "int8"), dp.L2Ball(image(13), 0.5, (0, 1))
    yield "mnistfc vs noise, L2 1.0, image 14", fc, derived(fc, "noise", 1), dp.L2Ball(image(14), 1.0, (0, 1))
    yield "mnistfc vs pruned, L2 0.5, image 15", fc, derived(fc, "pruned"), dp.L2Ball(image(15), 0.5, (0, 1))
    yield "mnistfc vs int8, L-inf 0.02, image 18", fc, derived(fc, "int8"), dp.LinfBall(image(18), 0.02, (0, 1))
    yield "mnistfc vs noise, L-inf 0.05, image 19", fc, derived(fc, "noise", 2), dp.LinfBall(image(19), 0.05, (0, 1))
    yield "HAR vs rounded, L2 0.3, point 2", h_a, h_b, dp.L2Ball(torch.from_numpy(har[2]), 0.3, (-1, 1))
    yield "HAR vs rounded, L2 1.0, point 3", h_a, h_b, dp.L2Ball(torch.from_numpy(har[3]), 1.0, (-1, 1))
    yield "HAR vs rounded, L-inf 0.05, point 4", h_a, h_b, dp.LinfBall(torch.from_numpy(har[4]), 0.05, (-1, 1))


def tiny_cases():
    """Pairs of 2-3 ReLU layers of <= 20 neurons: unrelated, W(1 + 0.05 N) and int8 copies."""
    for sizes, seed in (([4, 10, 10, 2], 0), ([5, 12, 12, 3], 1), ([3, 8, 8, 8, 2], 2)):
        a = random_network(sizes, seed)
        box = dp.LinfBall(torch.zeros(sizes[0], dtype=torch.float64), 1.0)
        yield f"tiny {'x'.join(map(str, sizes))} vs unrelated", a, random_network(sizes, seed + 100), box
        noisy = copy.deepcopy(a)
        with torch.no_grad():
            for p in noisy.parameters():
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        yield f"tiny {'x'.join(map(str, sizes))} vs W(1+0.05N)", a, noisy, box
        yield f"tiny {'x'.join(map(str, sizes))} vs int8", a, derived(a, "int8"), box


def exact_optimum(a, b, region):
    """The MILP optimum, or None when a MILP does not finish within its time limit."""
    from diffprobe.milp import exact_max
    try:
        return exact_max(a, b, region, time_limit=120).value
    except dp.DiffprobeError:
        return None


def main():
    print("| pair / region | budget | diffprobe search | PGD | random | exact (MILP) | search / PGD | search / random | search / exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tiny, generator in ((False, cases), (True, tiny_cases), (False, more_cases)):
        for name, a, b, region in generator():
            runs = [dp.search(a, b, region, steps=STEPS, restarts=RESTARTS, seed=seed) for seed in SEEDS]
            budget = runs[0].evaluations
            found = statistics.median(r.found for r in runs)
            p = statistics.median(pgd(a, b, region, budget, seed) for seed in SEEDS)
            r = statistics.median(random_max(a, b, region, budget, seed) for seed in SEEDS)
            exact = exact_optimum(a, b, region) if tiny else None
            print(f"| {name} | {budget} | {found:.4g} | {p:.4g} | {r:.4g} | "
                  f"{'-' if exact is None else f'{exact:.4g}'} | {found / p:.3f} | {found / r:.3f} | "
                  f"{'-' if exact is None else f'{found / exact:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
