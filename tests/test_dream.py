import pytest
import torch
from torch import nn

import diffprobe as dp
from diffprobe._dream import _transformed, colour_matrix, image_shape
from diffprobe.graph import compose
from diffprobe.layers import Network
from diffprobe.objectives import tv
from conftest import mlp, shifted


def small_cnn(seed):
    torch.manual_seed(seed)
    return Network([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)], (3, 8, 8)).eval()


@pytest.mark.parametrize("param", ["pixel", "sigmoid", "fft"])
def test_dream_witness_is_valid_and_rechecked(param):
    a, b = mlp([16, 12, 3], 0), mlp([16, 12, 3], 1)
    result = dp.dream(a, b, param=param, priors=-0.1 * tv(), steps=30, seed=0)
    x = result.witness()
    assert x.shape == (1, 4, 4) and bool((x >= 0).all() and (x <= 1).all())
    with torch.no_grad():  # re-checked on the models as they run (float32 here)
        out_a, out_b = compose(a, b).outputs(x.reshape(1, 16))
    assert result.found == pytest.approx((out_b - out_a).abs().max().item(), rel=1e-12)
    assert result.evaluations == 30 * 4 and "DeepDream" in result.warnings[0]


def test_dream_known_answer_and_region():
    a = mlp([16, 12, 3], 0)
    assert dp.dream(a, shifted(a, 0.3), steps=5).found == pytest.approx(0.3, abs=1e-6)
    center = torch.full((16,), 0.5, dtype=torch.float64)
    region = dp.LinfBall(center, 0.05, (0.0, 1.0))
    result = dp.dream(a, mlp([16, 12, 3], 1), region=region, param="sigmoid", steps=20)
    assert bool(region.reshape((1, 4, 4)).contains(result.witness().unsqueeze(0), tol=0))


def test_dream_on_colour_images_raises_the_disagreement():
    a, b = small_cnn(0), small_cnn(1)
    start = dp.dream(a, b, steps=1, seed=0).found
    result = dp.dream(a, b, steps=60, seed=0, colour=colour_matrix(torch.rand(10, 3, 8, 8)))
    assert result.found > start


def test_transforms_and_shapes():
    x = torch.rand(3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(_transformed(x, (), 2, gen), x.unsqueeze(0).expand(2, 3, 8, 8))
    out = _transformed(x, ("jitter", "scale", "rotate"), 5, gen)
    assert out.shape == (5, 3, 8, 8) and not torch.equal(out[0], out[1])
    assert image_shape((64,)) == (1, 8, 8) and image_shape((3, 32, 32)) == (3, 32, 32)
    with pytest.raises(dp.ShapeMismatchError, match="not images"):
        image_shape((10,))
    with pytest.raises(dp.ArgumentError, match="parameterisation"):
        dp.dream(mlp([16, 4, 2], 0), mlp([16, 4, 2], 1), param="wavelet")


def test_colour_matrix_is_a_root_of_the_channel_covariance():
    base = torch.rand(200, 1, 4, 4)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.rand(200, 1, 4, 4), torch.rand(200, 1, 4, 4)], 1)
    m = colour_matrix(images)
    cov = torch.cov(images.transpose(0, 1).reshape(3, -1))
    ratio = (m @ m.T) / cov
    assert torch.allclose(m, m.T, atol=1e-6) and torch.allclose(ratio, ratio[0, 0].expand(3, 3), rtol=1e-3)
