import copy

import pytest
import torch
from torch import nn

from diffprobe import Box, DataError, L2Ball, LinfBall, RegionError, ShapeMismatchError, search
from diffprobe.layers import Network
from conftest import mlp, shifted

REGIONS = {
    "box": lambda d: Box(-torch.ones(d), torch.ones(d) * 0.5),
    "linf": lambda d: LinfBall(torch.full((d,), 0.5), 0.3, (0.0, 1.0)),
    "l2": lambda d: L2Ball(torch.full((d,), 0.5), 0.4, (0.0, 1.0)),
}


@pytest.mark.parametrize("kind", REGIONS)
def test_shifted_copy_found_is_c_and_witness_inside(kind):
    a = mlp([5, 10, 3], seed=1)
    region = REGIONS[kind](5)
    result = search(a, shifted(a, -0.25), region, steps=10, restarts=3)
    assert abs(result.found - 0.25) < 1e-6
    assert region.contains(result.witness().double().unsqueeze(0), tol=0).all()
    # re-evaluated on the real models
    x = result.witness(torch.float32).unsqueeze(0)
    assert abs((shifted(a, -0.25)(x) - a(x)).abs().max().item() - result.found) < 1e-5


def linear(weight, bias):
    lin = nn.Linear(len(weight), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([weight]))
        lin.bias.fill_(bias)
    return Network([lin], (len(weight),))


@pytest.mark.parametrize("kind", ["box", "l2"])
def test_linear_pair_reaches_the_closed_form_maximum(kind):
    a, b = linear([1.0, -2.0, 0.5, 0.0], 0.1), linear([0.5, 1.0, 0.5, -1.0], -0.3)
    w, c = torch.tensor([-0.5, 3.0, 0.0, -1.0], dtype=torch.float64), -0.4
    region = REGIONS[kind](4)
    if kind == "box":
        lo, hi = region.bounding_box()
        best = max((torch.where(w > 0, hi, lo) @ w + c).abs(), (torch.where(w > 0, lo, hi) @ w + c).abs())
    else:  # max over ball ∩ box of |w.x + c|: check by projecting the gradient direction
        best = max(abs((region.project((region.center + 10 * s * w).unsqueeze(0))[0] @ w + c).item()) for s in (1, -1))
    result = search(a, b, region, steps=100, restarts=4)
    assert result.found == pytest.approx(float(best), abs=1e-4)
    # every phase but the gradient ascent switched off
    bare = search(a, b, region, steps=100, restarts=4, screen_fraction=0, random_fraction=0)
    assert bare.found == pytest.approx(float(best), abs=1e-4)


def test_same_seed_same_answer_and_trace():
    a, b = mlp([6, 12, 4], 2), mlp([6, 12, 4], 3)
    region = LinfBall(torch.zeros(6), 0.5)
    r1, r2 = (search(a, b, region, steps=20, restarts=4, seed=7) for _ in range(2))
    assert r1.x == r2.x and r1.trace == r2.trace and r1.evaluations == r2.evaluations
    assert r1.found >= max(r1.trace[:1])


def test_search_beats_random_sampling_on_a_random_pair():
    a, b = mlp([8, 32, 32, 4], 4), mlp([8, 32, 32, 4], 5)
    region = LinfBall(torch.zeros(8), 1.0)
    result = search(a, b, region, steps=50, restarts=8)
    x = region.sample(result.evaluations, torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        sampled = (b(x) - a(x)).abs().max().item()
    assert result.found >= sampled - 1e-6


def test_threshold_stops_early_and_zero_gradients_fall_back():
    a = mlp([3, 5, 2], 0)
    b = shifted(a, 1.0)
    result = search(a, b, Box(torch.zeros(3), torch.ones(3)), steps=200, restarts=2, threshold=0.5)
    assert result.found > 0.5 and len(result.trace) < 200

    class Rounded(nn.Module):  # piecewise constant: zero gradients everywhere
        input_shape = (3,)

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.round(self.inner(x) * 2) / 2

    result = search(Rounded(a), Rounded(mlp([3, 5, 2], 1)), Box(-torch.ones(3) * 3, torch.ones(3) * 3), steps=20, restarts=2)
    assert any("gradient-free" in w for w in result.warnings)


class _PlateauWithBump(nn.Module):
    """1 + a slope too small to matter + a narrow bump of height 1 at x1 = 0.6: the gradient
    ascent cannot see the bump from outside it, sampling can."""
    input_shape = (2,)

    def forward(self, x):
        return 1 + 1e-6 * x[:, :1] + torch.relu(1 - (x[:, 1:2] - 0.6).abs() / 0.02)


def test_a_stalled_ascent_hands_its_budget_to_the_gradient_free_search():
    zero = mlp([2, 1], 0)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    box = Box(-torch.ones(2), torch.ones(2))
    steps, restarts = 50, 4
    result = search(zero, _PlateauWithBump(), box, steps=steps, restarts=restarts, screen_fraction=0)
    assert any("gained nothing" in w for w in result.warnings)
    assert result.found > 1.5  # inside the bump, which only sampling reaches
    # the ascent's unspent steps are not added on top of the budget
    assert result.evaluations <= (1.1 * steps + 2) * restarts
    # falsification: the gradient-free search stops too once past the threshold
    early = search(zero, _PlateauWithBump(), box, steps=steps, restarts=restarts, screen_fraction=0, threshold=1.2)
    assert early.found > 1.2 and early.evaluations < result.evaluations
    smooth = search(zero, linear([1.0, 0.5], 0.0), box, steps=steps, restarts=restarts)
    assert not any("gained nothing" in w for w in smooth.warnings)


def test_data_points_nearest_a_decision_boundary_start_the_search():
    from diffprobe.graph import compose
    from diffprobe._search import _Evaluator
    from diffprobe.differences import get_difference
    a, b = mlp([2, 8, 3], 0), mlp([2, 8, 3], 1)
    box = Box(-torch.ones(2), torch.ones(2))
    points = torch.rand(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 2
    evaluate = _Evaluator(copy.deepcopy(compose(a, b, box)).double(), get_difference("elementwise"))
    chosen = evaluate.near_boundary(box, points, 3)
    inside = points[box.contains(points)]
    with torch.no_grad():
        margins = [torch.sort(m(inside.float()), dim=1, descending=True).values for m in (a, b)]
    smallest = torch.minimum(*[m[:, 0] - m[:, 1] for m in margins])
    assert torch.equal(chosen, inside[smallest.argsort()[:3]])
    assert evaluate.count == len(inside)  # ranking the data is paid for in evaluations

    # single output: the data point in the narrow bump is ranked first and kept
    zero = mlp([2, 1], 0)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    blind = dict(steps=20, restarts=2, screen_fraction=0, random_fraction=0)
    assert search(zero, _PlateauWithBump(), box, **blind).found < 1.5
    # one restart of two starts from data: the bump top (0.3, 0.6) must win over its flank and the
    # point outside the box
    data = torch.tensor([[0.1, -0.5], [0.3, 0.61], [0.3, 0.6], [3.0, 0.6]])
    assert search(zero, _PlateauWithBump(), box, data=data, **blind).found > 1.9


def test_a_restart_ascends_an_output_that_is_not_the_largest_at_the_starts():
    zero, two = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        zero.weight.zero_(), zero.bias.zero_()
        # output 1 is the larger at the start (1.0 vs 0.3) but output 0 reaches more (1.3 vs 1.1)
        two.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.1]]))
        two.bias.copy_(torch.tensor([0.3, 1.0]))
    a, b = Network([zero], (2,)), Network([two], (2,))
    result = search(a, b, Box(-torch.ones(2), torch.ones(2)), steps=20, restarts=4, starts=torch.zeros(3, 2),
                    screen_fraction=0, random_fraction=0)
    assert abs(result.found - 1.3) < 1e-6


def test_bad_input():
    a = mlp([3, 2], 0)
    with pytest.raises(RegionError):
        search(a, a, LinfBall(torch.zeros(3), 0.1), steps=0)
    with pytest.raises(ShapeMismatchError):
        search(a, a, LinfBall(torch.zeros(4), 0.1))
    with pytest.raises(DataError, match="input shape"):
        search(a, a, LinfBall(torch.zeros(3), 0.1), data=torch.zeros(5, 4))
    with pytest.raises(DataError, match="no points"):
        search(a, a, LinfBall(torch.zeros(3), 0.1), data=torch.zeros(0, 3))
