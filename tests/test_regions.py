import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffprobe import Box, L2Ball, LinfBall, RegionError, ball, box_from_vnnlib
from conftest import shared, examples


def regions(draw_seed, dim, eps, kind, clip):
    gen = torch.Generator().manual_seed(draw_seed)
    center = torch.rand(dim, generator=gen, dtype=torch.float64)
    clip = (0.0, 1.0) if clip else None
    if kind == "box":
        lo = center - eps * torch.rand(dim, generator=gen, dtype=torch.float64)
        return Box(lo, lo + 2 * eps * torch.rand(dim, generator=gen, dtype=torch.float64))
    return ball(center, eps, "inf" if kind == "linf" else "2", clip)


region_strategy = st.builds(regions, st.integers(0, 10_000), st.integers(1, 12),
                            st.floats(0.0, 2.0), st.sampled_from(["box", "linf", "l2"]), st.booleans())


@settings(max_examples=examples(60), deadline=None)
@given(region=region_strategy, seed=st.integers(0, 1000))
def test_samples_corners_and_projections_stay_inside(region, seed):
    gen = torch.Generator().manual_seed(seed)
    assert region.contains(region.sample(50, gen)).all()
    assert region.contains(region.corners(10, gen)).all()
    far = torch.randn(20, *region.shape, generator=gen, dtype=torch.float64) * 5
    projected = region.project(far)
    assert region.contains(projected, tol=1e-9).all()
    inside = region.sample(5, gen)
    assert torch.allclose(region.project(inside), inside)


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 1000), dim=st.integers(1, 8), eps=st.floats(0.01, 1.0))
def test_l2_projection_is_the_nearest_point(seed, dim, eps):
    gen = torch.Generator().manual_seed(seed)
    region = L2Ball(torch.rand(dim, generator=gen, dtype=torch.float64), eps, (0.0, 1.0))
    y = torch.randn(1, dim, generator=gen, dtype=torch.float64) * 3
    p = region.project(y)
    others = region.sample(2000, gen)
    assert (p - y).norm() <= (others - y).norm(dim=1).min() + 1e-7


def test_linf_ball_is_clipped_box():
    r = LinfBall(torch.tensor([0.0, 0.5, 1.0]), 0.2, clip=(0.0, 1.0))
    assert torch.equal(r.lower, torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64))
    assert torch.allclose(r.upper, torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64))
    assert r.to_dict()["eps"] == 0.2


@pytest.mark.parametrize("make, message", [
    (lambda: LinfBall(torch.zeros(3), -0.1), "eps must be"),
    (lambda: L2Ball(torch.zeros(3), float("nan")), "eps must be"),
    (lambda: Box(torch.ones(2), torch.zeros(2)), "empty"),
    (lambda: LinfBall(torch.full((2,), 2.0), 0.1, (0.0, 1.0)), "outside the clip="),
    (lambda: ball(torch.zeros(2), 0.1, "1"), "unknown norm"),
])
def test_bad_regions_say_what_is_wrong(make, message):
    with pytest.raises(RegionError, match=message):
        make()


def test_vnnlib_boxes():
    acas = box_from_vnnlib(shared("acasxu/prop_1.vnnlib"))
    assert acas.lower.tolist() == [0.6, -0.5, -0.5, 0.45, -0.5]
    assert acas.upper.tolist() == [0.679857769, 0.5, 0.5, 0.5, -0.45]
    mnist = box_from_vnnlib(shared("mnistfc/prop_0_0.03.vnnlib"))
    assert mnist.shape == (784,) and float((mnist.upper - mnist.lower).max()) <= 0.06 + 1e-6


def test_vnnlib_missing_bound(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(assert (<= X_0 1))\n"
                    "(assert (>= X_0 0))\n(assert (<= X_1 1))\n")
    with pytest.raises(RegionError, match=r"inputs \[1\]"):
        box_from_vnnlib(path)
