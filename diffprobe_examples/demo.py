"""A built-in pair for the demo, notebooks and tests: a digits classifier and its fine-tuned copy.

Trains in about a second on sklearn's bundled 8x8 digits (pixels scaled to [0, 1]), so nothing
is downloaded. `model_b` is `model_a` fine-tuned for a few epochs on a shifted subset (brighter
images of the digits 0-4), the drift diffprobe is built to measure.
"""
from dataclasses import dataclass

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.layers import Network


@dataclass(frozen=True)
class DigitsPair:
    model_a: nn.Module
    model_b: nn.Module
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data(seed=0):
    """(x_train, y_train, x_test, y_test) of sklearn's digits, pixels in [0, 1], 70/30 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DiffprobeError("the digits example needs scikit-learn: pip install scikit-learn") from exc
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def digits_mlp(hidden=32, seed=0):
    """64-hidden-hidden-10 ReLU classifier."""
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            bound = layer.in_features ** -0.5
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    return Network(layers, (64,))


def train(model, x, y, *, epochs=30, lr=0.01, seed=0, batch=64):
    """Plain Adam training with a seeded data order; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def digits_pair(seed=0, hidden=32):
    """A trained digits classifier and its copy fine-tuned on a shifted subset."""
    x_train, y_train, x_test, y_test = digits_data(seed)
    model_a = train(digits_mlp(hidden, seed), x_train, y_train, seed=seed)
    model_b = digits_mlp(hidden, seed)
    model_b.load_state_dict(model_a.state_dict())
    shifted = y_train < 5
    x_shift = (x_train[shifted] * 1.2).clamp(0, 1)
    model_b = train(model_b, x_shift, y_train[shifted], epochs=3, lr=1e-3, seed=seed + 1)
    return DigitsPair(model_a, model_b, x_test, y_test)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run_demo(seed=0, eps=0.02, points=3, threshold=3.0, progress=False):
    """The demo's data: the pair's accuracies and, around a few test images, a certificate of the
    logit drift (with its witness) and of top-1 agreement."""
    from diffprobe import certify
    from diffprobe import LinfBall
    pair = digits_pair(seed)
    rows = []
    for i in range(points):
        region = LinfBall(pair.x_test[i].double(), eps, (0.0, 1.0))
        drift = certify(pair.model_a, pair.model_b, region, threshold=threshold, seed=seed, progress=progress)
        top1 = certify(pair.model_a, pair.model_b, region, difference="top1", method="crown",
                       threshold=0.0, seed=seed)
        rows.append({"index": i, "drift": drift, "top1": top1})
    summary = {"seed": seed, "eps": eps, "threshold": threshold,
               "accuracy_a": accuracy(pair.model_a, pair.x_test, pair.y_test),
               "accuracy_b": accuracy(pair.model_b, pair.x_test, pair.y_test)}
    as_json = {**summary, "points": [{"index": r["index"], "drift": r["drift"].to_dict(),
                                      "top1": r["top1"].to_dict()} for r in rows]}
    return {"summary": summary, "rows": rows, "json": as_json}


def demo_text(report):
    """The demo's table for the terminal."""
    s = report["summary"]
    lines = ["diffprobe demo: a digits classifier (model_a) vs its copy fine-tuned on a shifted subset (model_b)",
             f"test accuracy: model_a {s['accuracy_a']:.3f}, model_b {s['accuracy_b']:.3f}",
             f"regions: L-inf balls of radius {s['eps']} around test images, clipped to [0, 1]",
             "",
             f"{'image':>5}  {'found max|b-a|':>14}  {'certified':>10}  {'gap':>6}  {'drift <= ' + str(s['threshold']):>14}  {'top-1 agreement':>16}"]
    for r in report["rows"]:
        d, t = r["drift"], r["top1"]
        agree = {"verified": "certified", "falsified": "FLIP FOUND", "unknown": "unknown"}[t.verdict.value]
        lines.append(f"{r['index']:>5}  {d.found:>14.5g}  {d.bound:>10.5g}  {d.gap_ratio:>6.3f}  "
                     f"{d.verdict.value:>14}  {agree:>16}")
    lines += ["", "found: a witness input inside the ball (lower bound); certified: a bound over the "
              "whole ball, without sampling (upper bound)."]
    return "\n".join(lines)
