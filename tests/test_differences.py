import pytest
import torch

from diffprobe import DIFFERENCES, ShapeMismatchError, compose, get_difference
from conftest import mlp, shifted


@pytest.mark.parametrize("c", [0.0, 0.37, -1.5])
def test_elementwise_of_a_shifted_copy_is_exactly_c(c):
    a = mlp([4, 6, 3], seed=0)
    b = shifted(a, c)
    pair = compose(a, b)
    out_a, out_b = pair.outputs(torch.rand(20, 4))
    diff = get_difference("elementwise")
    assert torch.allclose(diff.per_output(out_a, out_b), torch.full((20, 3), c, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(diff(out_a, out_b), torch.full((20,), abs(c), dtype=torch.float64), atol=1e-6)
    # a constant shift of every logit leaves the softmax unchanged
    for name in ("probability", "kl", "js"):
        assert get_difference(name)(out_a, out_b).abs().max() < 1e-6


def test_probability_kl_js_and_top1_known_values():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])  # softmax(b) = [0.25, 0.75]
    assert torch.allclose(get_difference("probability").per_output(a, b), torch.tensor([[-0.25, 0.25]]))
    kl = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert torch.allclose(get_difference("kl")(a, b), kl.reshape(1))
    m = torch.tensor([0.375, 0.625])
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert torch.allclose(get_difference("js")(a, b), js.reshape(1), atol=1e-6)
    a = torch.tensor([[2.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 1.5, 0.2]])
    assert torch.allclose(get_difference("top1")(a, b), torch.tensor([0.5]))  # b prefers label 1 by 0.5


def test_registry_says_what_is_certifiable():
    assert {n for n, d in DIFFERENCES.items() if d.bounded_as} == {"elementwise", "probability", "top1"}


def test_shape_mismatches_name_both_shapes():
    with pytest.raises(ShapeMismatchError, match=r"model_a takes \[4\], model_b takes \[5\]"):
        compose(mlp([4, 3], 0), mlp([5, 3], 0))
    with pytest.raises(ShapeMismatchError, match=r"model_a gives \[3\], model_b gives \[2\]"):
        compose(mlp([4, 3], 0), mlp([4, 2], 0))
