"""Graphs that branch and join (residual adds with and without a projection, concatenation, max
and average pooling, scalar arithmetic) lowered to chains: they reproduce the model, and the
differential bound holds on random networks and perturbed copies, exact and as fp16 runs them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from diffprobe import Box, LinfBall, certify
from diffprobe.deployment import deploy
from diffprobe.lowering import Declined, lower
from diffprobe_examples.networks import noisy_copy
from conftest import examples

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky": lambda: nn.LeakyReLU(0.2)}


class ResidualMLP(nn.Module):
    """x -> [h + f(h)] blocks, f = Linear-act-Linear, then two heads concatenated and mixed."""

    def __init__(self, width, blocks, act):
        super().__init__()
        self.input_shape = (3,)
        self.stem = nn.Linear(3, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), act(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.act, self.left, self.right = act(), nn.Linear(width, 2), nn.Linear(width, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.stem(x))
        for block in self.blocks:
            h = self.act(h + block(h))
        return self.head(torch.cat([self.left(h), torch.sigmoid(self.right(h)) - 0.5], dim=1)) * 2.0


class ResidualCNN(nn.Module):
    """conv, max pooling, a basic block with a strided projection shortcut, average pooling."""

    def __init__(self, channels, act, pool):
        super().__init__()
        self.input_shape = (1, 6, 6)
        c = channels
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(pool, stride=pool if pool == 2 else 1, padding=pool // 3)
        self.conv1, self.conv2 = nn.Conv2d(c, c + 1, 3, stride=2, padding=1), nn.Conv2d(c + 1, c + 1, 3, padding=1)
        self.project = nn.Sequential(nn.Conv2d(c, c + 1, 1, stride=2), nn.BatchNorm2d(c + 1))
        self.act, self.head = act(), nn.Linear(c + 1, 3)

    def forward(self, x):
        h = self.pool(self.act(self.bn(self.stem(x))))
        h = F.relu(self.conv2(self.act(self.conv1(h))) + self.project(h))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _randomised(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def _assert_bound_holds(a, b, region, arithmetic, seed):
    cert = certify(a, b, region, method="differential", arithmetic=arithmetic, search_steps=5, search_restarts=1)
    assert cert.method == "differential"
    pair = deploy(a, b, [region], arithmetic).pair
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([region.sample(2000, gen), region.corners(32, gen)]).reshape(-1, *a.input_shape)
    with torch.no_grad():
        d = torch.sub(*reversed(pair.outputs(x)))
    assert d.abs().max().item() <= cert.bound * (1 + 1e-9) + 1e-12
    return cert


@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), width=st.integers(2, 8), blocks=st.integers(1, 2),
       act=st.sampled_from(sorted(ACTS)), noise=st.sampled_from([0.0, 1e-3, 0.05]), radius=st.floats(1e-3, 1.0),
       arithmetic=st.sampled_from(["exact", "fp16"]))
def test_residual_mlp_bound_holds(seed, width, blocks, act, noise, radius, arithmetic):
    a = _randomised(ResidualMLP(width, blocks, ACTS[act]), seed)
    b = noisy_copy(a, noise, seed + 1)
    centre = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cert = _assert_bound_holds(a, b, Box(centre - radius, centre + radius), arithmetic, seed)
    if noise == 0.0 and arithmetic == "exact":
        assert cert.bound < 1e-9


@settings(max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 3), act=st.sampled_from(["relu", "gelu", "leaky"]),
       pool=st.sampled_from([2, 3]), noise=st.sampled_from([1e-3, 0.05]), radius=st.floats(1e-3, 0.3),
       arithmetic=st.sampled_from(["exact", "fp16"]))
def test_residual_cnn_bound_holds(seed, channels, act, pool, noise, radius, arithmetic):
    a = _randomised(ResidualCNN(channels, ACTS[act], pool), seed)
    b = noisy_copy(a, noise, seed + 1)
    centre = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _assert_bound_holds(a, b, LinfBall(centre, radius), arithmetic, seed)


def test_lowered_graph_reproduces_the_model():
    model = _randomised(ResidualCNN(2, nn.ReLU, 3), 0)
    chain = lower(model, model.input_shape, exact=True)
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(chain.module()(x), copy.deepcopy(model).double()(x).reshape(5, -1), atol=1e-10)
    layers = chain.layers()
    # skipped values ride through identity neurons: the block's layer holds more than its conv's outputs
    assert any(len(layer.activation.parts) > 1 for layer in layers[:-1])


def test_unlowerable_graph_is_declined_by_name():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) * self.b(x)  # a product of two computed tensors: not linear
    with pytest.raises(Declined, match="multiplies two computed tensors"):
        lower(Gated(), (3,), exact=True)
    # still bounded, by the composed graph, with the reason in the notes
    cert = certify(Gated(), Gated(), LinfBall(torch.zeros(3), 0.1), search_steps=5)
    assert cert.bound < float("inf") and cert.method != "differential"
