import pytest
import torch

import diffprobe as dp
from diffprobe.objectives import as_objective, flip, l2, tv
from conftest import mlp


def test_algebra_names_and_values():
    diff = dp.get_difference("elementwise")
    obj = 2 * diff - 0.5 * tv() + l2()
    assert obj.name == "2 * elementwise - 0.5 * tv + l2" and obj.base is diff
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    x = torch.rand(3, 1, 5, 5)
    tv_x = (x.diff(dim=-1).abs().reshape(3, -1).mean(1) + x.diff(dim=-2).abs().reshape(3, -1).mean(1))
    expected = 2 * (b - a).abs().amax(1) - 0.5 * tv_x + (x.reshape(3, -1) ** 2).mean(1)
    assert torch.allclose(obj(a, b, x), expected)
    assert (diff - flip(0, 1)).name == "elementwise - flip(0->1)"
    assert (-(diff + tv())).name == "-(elementwise + tv)"
    with pytest.raises(TypeError):
        as_objective(3)


def test_dlr_is_scale_invariant_and_agrees_in_sign_with_top1():
    gen = torch.Generator().manual_seed(0)  # float64: scaling by 7 must not change a rounding
    a, b = (torch.randn(50, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    dlr, top1 = dp.get_difference("dlr"), dp.get_difference("top1")
    assert torch.allclose(dlr(a, 7.0 * b), dlr(a, b))
    assert not torch.allclose(top1(a, 7.0 * b), top1(a, b))
    assert torch.equal(dlr(a, b) > 0, top1(a, b) > 0)


def test_dlr_search_finds_the_flips_top1_finds():
    # regression: the -inf entry of model_a's own label once made every DLR gradient NaN
    a, b = mlp([5, 16, 4], 0), mlp([5, 16, 4], 3)
    region = dp.LinfBall(torch.zeros(5, dtype=torch.float64), 0.5)
    top1 = dp.search(a, b, region, difference="top1", steps=30, restarts=4)
    dlr = dp.search(a, b, region, difference="dlr", steps=30, restarts=4)
    assert top1.found > 0 and dlr.found > 0


def test_targeted_flip_reaches_a_reachable_label_pair():
    a, b = mlp([2, 12, 3], 1, scale=3.0), mlp([2, 12, 3], 2, scale=3.0)
    grid = torch.stack(torch.meshgrid(torch.linspace(-2, 2, 81), torch.linspace(-2, 2, 81), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        pairs = set(zip(a(grid).argmax(1).tolist(), b(grid).argmax(1).tolist()))
    i, j = sorted(p for p in pairs if p[0] != p[1])[0]
    region = dp.Box(-2 * torch.ones(2), 2 * torch.ones(2))
    found = dp.search(a, b, region, difference=flip(i, j), steps=50, restarts=8)
    x = found.witness().float().unsqueeze(0)
    with torch.no_grad():
        assert (a(x).argmax().item(), b(x).argmax().item()) == (i, j)
    assert found.difference == f"flip({i}->{j})"
