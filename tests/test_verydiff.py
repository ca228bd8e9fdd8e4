"""VeryDiff's properties: top-1 and delta-top-1 equivalence over a region."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import diffprobe as dp
from diffprobe.differences import top1_where_confident
from diffprobe_examples.pruning import magnitude_pruned
from conftest import examples, mlp, shared


def noisy(model, scale, seed):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def violations(a, b, x, delta):
    """Inputs where model_a's top probability is >= delta and model_b's label differs."""
    with torch.no_grad():
        pa, lb = torch.softmax(a(x), 1), b(x).argmax(1)
    return (pa.amax(1) >= delta) & (pa.argmax(1) != lb)


def test_the_value_is_positive_exactly_at_a_confident_flip():
    diff = top1_where_confident(0.8)
    a = torch.tensor([[math.log(4.0), 0.0, -50.0], [math.log(3.0), 0.0, -50.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    value = diff(a, b)  # p = 0.8 (log-odds 0), p = 0.75 (< 0.8), and a label model_b keeps
    assert value[0].item() == pytest.approx(0.0, abs=1e-12) and value[1] < 0 and value[2] < 0
    assert dp.get_difference("top1@0.8").confidence == 0.8 and diff.name == "top1@0.8"
    with pytest.raises(dp.ArgumentError):
        top1_where_confident(1.0)


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), width=st.integers(2, 12), noise=st.sampled_from([1e-3, 0.05, 0.3]),
       radius=st.floats(0.01, 1.5), delta=st.sampled_from([0.4, 0.6, 0.9, 0.99]),
       method=st.sampled_from(["auto", "crown", "differential", "ibp"]))
def test_confident_top1_verdicts_are_sound(seed, width, noise, radius, delta, method):
    a = mlp([3, width, width, 4], seed)
    b = noisy(a, noise, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    region = dp.LinfBall(torch.randn(3, generator=gen, dtype=torch.float64), radius)
    cert = dp.certify(a, b, region, difference=top1_where_confident(delta), method=method, arithmetic="exact")
    x = torch.cat([region.sample(3000, gen), region.corners(100, gen)])
    if cert.verdict == dp.Verdict.VERIFIED:
        assert not violations(a.double(), b.double(), x, delta).any()
    if cert.verdict == dp.Verdict.FALSIFIED:  # the witness is a confident flip, inside the region
        w = torch.tensor(cert.witness, dtype=torch.float64)[None]
        assert region.contains(w).all() and violations(a.double(), b.double(), w, delta).all()


def test_top1_and_confident_top1_on_a_pruned_mnist_pair():
    """VeryDiff's MNIST setting: 3x100 vs a copy with 5 % of its weights pruned by magnitude,
    15 pixels of a test image free in [0, 1]."""
    import numpy as np
    a = dp.load_model(shared("mnist_3x100/mnist_relu_3_100.nnet"))
    b = magnitude_pruned(a, 0.05)
    image = torch.tensor(np.load(shared("mnist_3x100/mnist_test_inputs.npy"))[0], dtype=torch.float64)
    free = image.argsort()[300:315]  # 15 pixels, mid-image
    lo, hi = image.clone(), image.clone()
    lo[free], hi[free] = 0.0, 1.0
    region = dp.Box(lo, hi)
    top1 = dp.certify(a, b, region, difference="top1")
    assert top1.verdict == dp.Verdict.VERIFIED and "differential" in top1.method
    confident = dp.certify(a, b, region, difference=top1_where_confident(0.9))
    assert confident.verdict == dp.Verdict.VERIFIED
    # where it does not hold (60 % pruned, L-inf 0.05 balls): a confident flip, re-checked
    heavier = magnitude_pruned(a, 0.6)
    images = torch.tensor(np.load(shared("mnist_3x100/mnist_test_inputs.npy"))[:4], dtype=torch.float64)
    flips = [dp.certify(a, heavier, dp.LinfBall(x, 0.05, (0.0, 1.0)), difference=top1_where_confident(0.9),
                        search_steps=200) for x in images]
    falsified = [c for c in flips if c.verdict == dp.Verdict.FALSIFIED]
    assert falsified and all(c.bound > 0 for c in flips)
    for c in falsified:
        w = torch.tensor(c.witness, dtype=torch.float64)[None]
        assert violations(a.double(), heavier.double(), w, 0.9).all()


def test_a_softmax_head_is_set_aside_for_label_properties():
    """Networks exported with their final Softmax (VeryDiff's jet-tagging MLPs): top-1 and
    delta-top-1 are certified on the logits, where labels and confidence read the same."""
    from diffprobe.layers import Network
    a = mlp([16, 32, 32, 5], 7)
    b = noisy(a, 0.01, 8)
    head = lambda m: Network(list(m) + [torch.nn.Softmax(dim=1)], (16,))
    region = dp.LinfBall(torch.zeros(16, dtype=torch.float64), 0.05)
    for diff in ("top1", top1_where_confident(0.9)):
        plain = dp.certify(a, b, region, difference=diff, arithmetic="exact")
        headed = dp.certify(head(a), head(b), region, difference=diff, arithmetic="exact")
        assert headed.verdict == plain.verdict and headed.bound == pytest.approx(plain.bound, rel=1e-9)
