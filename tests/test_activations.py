"""Soundness of every activation's relaxations (lines, intervals, difference lines) on random
boxes against dense sampling of the function, and of the differential engine on networks built
from each activation, in exact arithmetic and as the fp16 copy runs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from diffprobe import Box, certify
from diffprobe.activations import IDENTITY, RELU_FN, SMOOTH, LeakyReLU, elu
from diffprobe.deployment import deploy
from diffprobe.differences import get_difference
from diffprobe_examples.deployed import deployed_copy, native_max, torchao_available
from diffprobe_examples.networks import noisy_copy
from conftest import examples, mlp

ACTIVATIONS = {**SMOOTH, "relu": RELU_FN, "identity": IDENTITY, "leaky": LeakyReLU(0.1), "elu": elu(1.0),
               "elu(0.3)": elu(0.3), "elu(1.7)": elu(1.7)}
MODULES = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
           "tanh": nn.Tanh, "softplus": nn.Softplus, "leaky": lambda: nn.LeakyReLU(0.1), "elu(0.3)": lambda: nn.ELU(0.3)}
TOL = 1e-10


def _box(gen, n, centre, width):
    lo = centre + width * (torch.rand(n, generator=gen, dtype=torch.float64) - 0.7)
    return lo, lo + width * torch.rand(n, generator=gen, dtype=torch.float64)


def _inside(lo, hi, k, gen):
    """k points per entry of the box [lo, hi] ([n] each), the ends included: [k + 2, n]."""
    t = torch.cat([torch.zeros(1, len(lo)), torch.ones(1, len(lo)), torch.rand(k, len(lo), generator=gen)])
    return lo + (hi - lo) * t.double()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@settings(max_examples=examples(25), deadline=None)
@given(seed=st.integers(0, 10_000), centre=st.floats(-6, 6), width=st.sampled_from([1e-6, 1e-2, 0.5, 3.0, 12.0]))
def test_lines_and_interval_hold_on_dense_samples(name, seed, centre, width):
    act, gen = ACTIVATIONS[name], torch.Generator().manual_seed(seed)
    l, u = _box(gen, 64, centre, width)
    z = _inside(l, u, 400, gen)
    y = act(z)
    lo_s, lo_c, up_s, up_c = (t.unsqueeze(0) for t in act.lines(l.unsqueeze(0), u.unsqueeze(0)))
    slack = TOL * (1 + z.abs())
    assert (lo_s * z + lo_c <= y + slack).all() and (y <= up_s * z + up_c + slack).all()
    low, high = act.interval(l.unsqueeze(0), u.unsqueeze(0))
    assert (low - slack <= y).all() and (y <= high + slack).all()
    gl, gu = act.slopes(l.unsqueeze(0), u.unsqueeze(0))
    h = 1e-7
    inner = z[2:].clamp(l + h, u - h)  # a finite-difference slope between points of [l, u]
    slope = (act(torch.minimum(inner + h, u)) - act(inner)) / h
    fits = (u - l > 2 * h).unsqueeze(0)
    assert ((slope >= gl - 1e-5) & (slope <= gu + 1e-5) | ~fits).all()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@settings(max_examples=examples(25), deadline=None)
@given(seed=st.integers(0, 10_000), centre=st.floats(-5, 5), width=st.sampled_from([1e-3, 0.3, 2.0, 8.0]),
       shift=st.sampled_from([0.0, 1e-4, 0.05, 1.0]))
def test_difference_lines_hold_on_dense_samples(name, seed, centre, width, shift):
    """E = sigma(z + D) - sigma(z) between the difference lines and inside the interval, for every
    sampled (z, D) with z in [l, u], D in [dl, du] and z + D in [l', u']."""
    act, gen = ACTIVATIONS[name], torch.Generator().manual_seed(seed)
    n = 48
    l, u = _box(gen, n, centre, width)
    dl, du = _box(gen, n, torch.zeros(n, dtype=torch.float64), shift + 1e-12)
    lp, up = torch.minimum(l + dl, u + du), torch.maximum(l + dl, u + du)  # where z + D can be, then cut
    lp, up = lp + 0.2 * (up - lp) * torch.rand(n, generator=gen, dtype=torch.float64), up
    lines = act.differences(*(t.unsqueeze(0) for t in (l, u, lp, up, dl, du)))
    lo_p, up_p, lo_q, up_q, lo_r, up_r = (t[0] for t in lines)
    e_lo, e_hi = (t[0] for t in act.difference_interval(*(t.unsqueeze(0) for t in (l, u, lp, up, dl, du))))
    z, d = _inside(l, u, 300, gen), _inside(dl, du, 300, gen)[torch.randperm(302, generator=gen)]
    ok = (z + d >= lp) & (z + d <= up)
    e = act(z + d) - act(z)
    slack = TOL * (1 + z.abs() + d.abs())
    low, high = lo_p * d + lo_q * z + lo_r, up_p * d + up_q * z + up_r
    assert ((low <= e + slack) & (e <= high + slack) | ~ok).all()
    assert ((e_lo - slack <= e) & (e <= e_hi + slack) | ~ok).all()


@pytest.mark.parametrize("name", sorted(SMOOTH) + ["elu", "elu(0.3)"])
def test_curvature_bounds_the_second_derivative(name):
    """The sag below grid points assumes |sigma''| <= curvature: checked on a dense grid."""
    act = ACTIVATIONS[name]
    z = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    first = act.derivative(z)
    second = (first[1:] - first[:-1]) / (z[1:] - z[:-1])
    same_side = torch.ones_like(second, dtype=torch.bool)
    for kink in act.kinks:  # sigma' may jump there: not a curvature
        same_side &= (z[1:] - kink) * (z[:-1] - kink) > 0
    assert second[same_side].abs().max().item() <= act.curvature


@pytest.mark.parametrize("name", sorted(MODULES))
@settings(max_examples=examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), width=st.integers(2, 10),
       noise=st.sampled_from([0.0, 1e-3, 0.1]), radius=st.floats(1e-3, 1.5),
       arithmetic=st.sampled_from(["exact", "fp16", "bf16"]))
def test_differential_bound_holds_for_each_activation(name, seed, depth, width, noise, radius, arithmetic):
    """Random networks of each activation and perturbed copies: every sampled difference of the
    models as they run (fp16/bf16: both cast and run in that format) lies within the bound."""
    a = mlp([3] + [width] * depth + [2], seed, act=MODULES[name])
    b = noisy_copy(a, noise, seed)
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(3, generator=gen, dtype=torch.float64)
    region = Box(centre - radius, centre + radius)
    cert = certify(a, b, region, method="differential", arithmetic=arithmetic, search_steps=5, search_restarts=1)
    pair = deploy(a, b, [region], arithmetic).pair
    x = torch.cat([region.sample(3000, gen), region.corners(64, gen)])
    with torch.no_grad():
        d = torch.sub(*reversed(pair.outputs(x)))
    assert d.abs().max().item() <= cert.bound * (1 + 1e-9) + 1e-12
    if noise == 0.0 and arithmetic == "exact":
        assert cert.bound < 1e-9  # identical models: the mean-value lines cancel exactly


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh"])
@settings(max_examples=examples(4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), width=st.integers(4, 16), radius=st.floats(0.01, 0.5),
       kind=st.sampled_from(["int8-dynamic"] + (["torchao-weight"] if torchao_available() else [])))
def test_int8_copies_of_smooth_networks_are_bounded_soundly(name, seed, width, radius, kind):
    """An int8 copy (torch.ao dynamic, torchao weight-only) of a network with a smooth activation:
    no composed graph bounds it as it runs, the differential engine does; the deployed modules,
    sampled and attacked, never exceed that bound."""
    a = mlp([6, width, width, 3], seed, act=MODULES[name])
    b = deployed_copy(a, kind)
    centre = torch.rand(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    region = Box(centre - radius, centre + radius)
    cert = certify(a, b, region, search_steps=10, search_restarts=2)
    assert cert.method == "auto(differential)" and cert.bound < float("inf")
    assert native_max(a, b, region, get_difference("elementwise"), n=2000, steps=20, seed=seed) <= cert.bound * (1 + 1e-9)
