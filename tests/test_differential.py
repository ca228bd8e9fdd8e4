
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from diffprobe import Box, LinfBall, UnsupportedOperationError, certify, load_model
from diffprobe.deployment import deploy
from diffprobe.differential import DifferentialBounds, matching_layers
from diffprobe.layers import Elementwise, Network
from diffprobe.lowering import Declined, lower
from diffprobe_examples.networks import noisy_copy
from diffprobe_examples.pruning import pruned_copy
from conftest import mlp, shared, examples


perturbed = noisy_copy


def engine_bounds(a, b, lo, hi, arithmetic="exact"):
    chains = deploy(a, b, [Box(lo[0], hi[0]).reshape(input_shape(a))], arithmetic).chains
    return DifferentialBounds(matching_layers(*chains)).bounds(lo, hi)


def input_shape(model):
    return getattr(model, "input_shape", None) or (model[0].in_features,)


def affine_chain(model, shape):
    """The exact lowered layers as (W, b) pairs, or None when the model is not an affine/ReLU chain."""
    try:
        layers = lower(model, shape, exact=True).layers()
    except Declined:
        return None
    return None if layers is None else [(layer.weight, layer.bias) for layer in layers]


def assert_contains_samples(a, b, box, lower, upper, gen, n=500, shape=None):
    """Every one of n random points and 50 corners of `box` has b(x) - a(x) within [lower, upper]
    (up to float64 rounding)."""
    x = torch.cat([box.sample(n, gen), box.corners(50, gen)])
    x = x if shape is None else x.reshape(-1, *shape)
    with torch.no_grad():
        d = b.double()(x) - a.double()(x)
    slack = 1e-9 * (1 + d.abs().max())
    assert (d >= lower - slack).all() and (d <= upper + slack).all()


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 4), width=st.integers(1, 12),
       noise=st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 2.0]), radius=st.floats(1e-4, 3.0),
       bias_shift=st.floats(-3, 3), boxes=st.integers(1, 4))
def test_differential_bounds_contain_every_sample(seed, depth, width, noise, radius, bias_shift, boxes):
    a = mlp([3] + [width] * depth + [2], seed)
    with torch.no_grad():  # large bias shifts make whole layers stably active or inactive
        for m in a:
            if isinstance(m, nn.Linear):
                m.bias.add_(bias_shift)
    b = perturbed(a, noise, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(boxes, 3, generator=gen, dtype=torch.float64)
    lo, hi = centers - radius, centers + radius * torch.rand(boxes, 3, generator=gen, dtype=torch.float64)
    lower, upper = engine_bounds(a, b, lo, hi)
    for i in range(boxes):
        assert_contains_samples(a, b, Box(lo[i], hi[i]), lower[i], upper[i], gen)
    if noise == 0.0:
        assert upper.abs().max() < 1e-9 and lower.abs().max() < 1e-9  # identical: exactly zero


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), width=st.integers(1, 10),
       noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0]), radius=st.floats(1e-3, 2.0), rows=st.integers(1, 5),
       boxes=st.integers(1, 3))
def test_rows_over_both_outputs_contain_every_sample(seed, depth, width, noise, radius, rows, boxes):
    """C_a a + C_b b, bounded as (C_a + C_b) a + C_b (b - a) (top-1 margins of model_b), per box."""
    a = mlp([3] + [width] * depth + [3], seed)
    b = perturbed(a, noise, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(boxes, 3, generator=gen, dtype=torch.float64)
    lo, hi = centers - radius, centers + radius * torch.rand(boxes, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(boxes, rows, 6, generator=gen, dtype=torch.float64).round(decimals=1)
    chains = deploy(a, b, [Box(lo[0], hi[0])], "exact").chains
    engine = DifferentialBounds(matching_layers(*chains))
    lower, upper = engine.bounds(lo, hi, spec=c[..., 3:], spec_z=c[..., :3] + c[..., 3:])
    for i in range(boxes):
        box = Box(lo[i], hi[i])
        x = torch.cat([box.sample(500, gen), box.corners(50, gen)])
        with torch.no_grad():
            values = torch.cat([a.double()(x), b.double()(x)], dim=1) @ c[i].T
        slack = 1e-9 * (1 + values.abs().max())
        assert (values >= lower[i] - slack).all() and (values <= upper[i] + slack).all()


def test_top1_margins_of_a_close_copy_use_the_differential_engine():
    a = mlp([4, 16, 16, 3], 3)
    b = perturbed(a, 1e-3, 4)
    region = LinfBall(torch.full((4,), 0.3, dtype=torch.float64), 0.05)
    auto = certify(a, b, region, difference="top1", arithmetic="exact")
    crown = certify(a, b, region, difference="top1", method="crown", arithmetic="exact")
    assert "differential" in auto.method and auto.bound <= crown.bound
    assert auto.found <= auto.bound  # the witness never beats the bound


def test_identical_and_shifted_copies_are_exact():
    a = mlp([4, 10, 10, 3], 0)
    b = perturbed(a, 0.0, 0)
    with torch.no_grad():
        b[-1].bias.add_(0.25)
    lower, upper = engine_bounds(a, b, -torch.ones(1, 4), torch.ones(1, 4))
    assert torch.allclose(lower, torch.full_like(lower, 0.25)) and torch.allclose(upper, torch.full_like(upper, 0.25))


def test_structure_detection_and_fallback_note():
    assert affine_chain(Network([Elementwise(2.0, 1.0), nn.Flatten(), nn.Linear(3, 4), nn.ReLU(),
                                 nn.Linear(4, 2), Elementwise(0.5, 0.0)], (3,)), (3,)) is not None
    tanh = lower(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (3,), exact=True).layers()
    assert [layer.activation.activations[0].name for layer in tanh[:-1]] == ["tanh"]
    with pytest.raises(Declined, match="Hardswish"):  # an activation without a relaxation
        lower(nn.Sequential(nn.Linear(3, 4), nn.Hardswish(), nn.Linear(4, 2)), (3,), exact=True)
    a, b = mlp([3, 5, 2], 0), mlp([3, 5, 5, 2], 1)
    assert matching_layers(*deploy(a, b, [LinfBall(torch.zeros(3), 0.1)]).chains) is None
    with pytest.raises(UnsupportedOperationError, match="do not match"):
        certify(a, b, LinfBall(torch.zeros(3), 0.1), method="differential")
    fallback = certify(a, b, LinfBall(torch.zeros(3), 0.1))
    assert "crown" in fallback.method and any("do not match" in n for n in fallback.notes)


def test_folded_normalisation_matches_the_network():
    net = Network([Elementwise(torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 0.0, -1.0])),
                   nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), Elementwise(3.0, 0.5)], (3,))
    chain = affine_chain(net, (3,))
    x = torch.randn(7, 3, dtype=torch.float64)
    h = x
    for i, (w, b) in enumerate(chain):
        h = h @ w.T + b
        h = torch.relu(h) if i < len(chain) - 1 else h
    assert torch.allclose(h, net.double()(x))


@pytest.mark.parametrize("eps, reference", [(1 / 255, 2.54e-3), (3 / 255, 3.69e-3), (8 / 255, 1.03e-2)])
def test_mnist_fp16_pair_at_least_as_tight_as_the_reference(eps, reference):
    a = load_model(shared("mnist_3x100/mnist_relu_3_100.nnet"))
    b = load_model(shared("mnist_3x100/mnist_relu_3_100_16bit.nnet"))
    center = torch.from_numpy(np.load(shared("mnist_3x100/mnist_test_inputs.npy"))[0])
    cert = certify(a, b, LinfBall(center, eps, (0.0, 1.0)), method="differential", search_steps=20)
    assert cert.found <= cert.bound <= reference * 1.005


def small_cnn(seed, channels):
    gen = torch.Generator().manual_seed(seed)
    net = Network([nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.AvgPool2d(2),
                   nn.Conv2d(channels, channels, 2), nn.ReLU(), nn.Flatten(), nn.Linear(channels, 3)],
                  (1, 4, 4)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        net[1].running_mean.copy_(torch.randn(channels, generator=gen) * 0.1)
        net[1].running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    return net


def test_conv_batchnorm_avgpool_chain_is_lowered_exactly():
    net = small_cnn(0, 3)
    chain = affine_chain(net, (1, 4, 4))
    assert chain is not None and len(chain) == 3  # conv+BN | avgpool+conv | flatten+linear
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    h = x.reshape(5, -1)
    for i, (w, b) in enumerate(chain):
        h = h @ w.T + b
        h = torch.relu(h) if i < len(chain) - 1 else h
    assert torch.allclose(h, net.double()(x))
    assert affine_chain(Network([nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)], (1, 4, 4)), (1, 4, 4)) is None


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 3), noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
       radius=st.floats(1e-3, 2.0))
def test_cnn_differential_bounds_contain_every_sample(seed, channels, noise, radius):
    a = small_cnn(seed, channels)
    b = perturbed(a, noise, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    lo, hi = center - radius, center + radius
    lower, upper = engine_bounds(a, b, lo, hi)
    assert_contains_samples(a, b, Box(lo[0], hi[0]), lower, upper, gen, shape=(1, 4, 4))
    if noise == 0.0:
        assert upper.abs().max() < 1e-9 and lower.abs().max() < 1e-9


def test_node_pruned_copy_is_aligned_exactly():
    a = mlp([4, 12, 10, 3], 0)
    keep = [[0, 2, 3, 5, 6, 7, 9, 11], [1, 2, 3, 4, 6, 8, 9]]
    with torch.no_grad():  # the pruned neurons contribute nothing: b computes the same function
        a[2].weight[:, [1, 4, 8, 10]] = 0
        a[4].weight[:, [0, 5, 7]] = 0
    b = pruned_copy(a, keep)
    x = torch.randn(100, 4)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    lo, hi = -torch.ones(1, 4), torch.ones(1, 4)
    for first, second in ((a, b), (b, a)):  # either model may be the pruned one
        lower, upper = engine_bounds(first, second, lo, hi)
        assert upper.abs().max() < 1e-6 and lower.abs().max() < 1e-6


def test_pruned_and_perturbed_copy_is_sound_and_tighter_than_crown():
    a = mlp([5, 20, 20, 3], 1)
    b = perturbed(pruned_copy(a, [list(range(0, 20, 2)) + [1, 3], list(range(16))]), 1e-3, 2)
    region = LinfBall(torch.zeros(5), 0.3)
    diff = certify(a, b, region, method="differential", search_steps=20)
    crown = certify(a, b, region, method="crown", search_steps=20)
    x = region.sample(3000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = (b.double()(x) - a.double()(x)).abs().max().item()
    assert sampled <= diff.bound + 1e-9 and diff.bound < crown.bound


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), width=st.integers(2, 10),
       noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0]), radius=st.floats(1e-3, 3.0), prune=st.booleans())
def test_alpha_differential_bounds_contain_every_sample(seed, depth, width, noise, radius, prune):
    a = mlp([3] + [width] * depth + [2], seed)
    b = perturbed(a, noise, seed + 1)
    if prune and width > 2:  # b loses a neuron per hidden layer: its alpha-CROWN bounds are not used
        b = pruned_copy(b, [list(range(1, width))] * depth)
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(3, generator=gen, dtype=torch.float64)
    region = Box(center - radius, center + radius)
    cert = certify(a, b, region, method="alpha-differential", search_steps=5, search_restarts=2)
    lower, upper = (torch.tensor(v, dtype=torch.float64) for v in (cert.lower, cert.upper))
    assert_contains_samples(a, b, region, lower, upper, gen, n=2000)


def test_alpha_differential_is_much_tighter_on_a_deep_network():
    a = load_model(shared("acasxu/ACASXU_run2a_1_1_batch_2000.nnet"))
    b = load_model(shared("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet"))
    center = torch.rand(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    region = LinfBall(center, 0.05)
    plain = certify(a, b, region, method="differential", search_steps=20)
    optimised = certify(a, b, region, method="alpha-differential", search_steps=20)
    assert optimised.found <= optimised.bound < plain.bound / 3  # measured: 0.26 -> 0.036


@settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), width=st.integers(2, 12),
       noise=st.sampled_from([1e-3, 0.05, 0.5]), radius=st.floats(0.05, 1.5),
       arithmetic=st.sampled_from(["exact", "native", "fp16"]))
def test_branch_and_bound_bounds_contain_every_sample(seed, depth, width, noise, radius, arithmetic):
    """Children start from their parents' pre-activation bounds: the final bound still holds, for
    the pair in exact arithmetic and as it runs (fp32, fp16)."""
    a = mlp([3] + [width] * depth + [2], seed)
    b = perturbed(a, noise, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    region = Box(*(lambda c: (c - radius, c + radius))(torch.randn(3, generator=gen, dtype=torch.float64)))
    cert = certify(a, b, region, method="differential", time_budget=2.0, tolerance=0.0, arithmetic=arithmetic,
                   search_steps=5, search_restarts=1)
    assert cert.branches > 1
    pair = deploy(a, b, [region], arithmetic).pair
    x = torch.cat([region.sample(4000, gen), region.corners(64, gen)])
    with torch.no_grad():
        d = torch.sub(*reversed(pair.outputs(x)))
    assert d.abs().max().item() <= cert.bound * (1 + 1e-9) + 1e-12
    lower, upper = (torch.tensor(t, dtype=torch.float64) for t in (cert.lower, cert.upper))
    assert (d >= lower - 1e-12).all() and (d <= upper + 1e-12).all()
