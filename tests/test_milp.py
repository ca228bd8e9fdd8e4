import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import diffprobe as dp
from diffprobe.graph import compose
from diffprobe.milp import exact_max
from conftest import examples, mlp, shifted

pytest.importorskip("scipy")


def _box(seed, dim, radius):
    gen = torch.Generator().manual_seed(seed)
    center = torch.rand(dim, generator=gen, dtype=torch.float64) * 2 - 1
    return dp.LinfBall(center, radius)


@settings(max_examples=examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), radius=st.floats(0.05, 1.0), noise=st.sampled_from([1e-2, 0.3]),
       method=st.sampled_from(["crown", "differential", "auto"]))
def test_exact_maximum_sits_between_witness_samples_and_certificate(seed, radius, noise, method):
    a = mlp([3, 6, 5, 2], seed)
    b = mlp([3, 6, 5, 2], seed)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(noise * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    region = _box(seed, 3, radius)
    exact = exact_max(a, b, region)
    pair = compose(a, b).double()
    with torch.no_grad():
        at_x = pair.outputs(torch.tensor([exact.x], dtype=torch.float64))
        sampled = pair.outputs(region.sample(5000, torch.Generator().manual_seed(seed)))
    assert (at_x[1] - at_x[0]).abs().max().item() == pytest.approx(exact.value, rel=1e-6, abs=1e-9)
    assert (sampled[1] - sampled[0]).abs().max().item() <= exact.value + 1e-9
    cert = dp.certify(a, b, region, method=method, search_steps=30, search_restarts=4)
    assert cert.found <= exact.value + 1e-9 <= cert.bound + 2e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_reaches_the_exact_optimum_on_tiny_pairs(seed):
    a, b = mlp([4, 10, 10, 2], seed), mlp([4, 10, 10, 2], seed + 100)
    region = _box(seed, 4, 0.5)
    exact = exact_max(a, b, region)
    found = dp.search(a, b, region, steps=100, restarts=8, seed=0).found
    assert found >= 0.95 * exact.value


def test_known_answer_and_unsupported_inputs():
    a = mlp([3, 5, 2], 0)
    assert exact_max(a, shifted(a, 0.25), _box(0, 3, 1.0)).value == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(dp.UnsupportedOperationError):
        exact_max(a, a, dp.L2Ball(torch.zeros(3, dtype=torch.float64), 0.1))
