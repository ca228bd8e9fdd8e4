"""Small networks with seeded random weights: the pairs of tests, benchmarks and tutorials."""
import torch
from torch import nn

from diffprobe.layers import Network


def random_network(sizes, seed, act=nn.ReLU, scale=1.0):
    """A fully connected network of the given layer widths with seeded random weights
    (N(0, scale^2 / fan-in)) and small biases: the pairs of tests, benchmarks and tutorials."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * scale / n_in ** 0.5)
            lin.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
        layers += [lin] + ([act()] if i < len(sizes) - 2 else [])
    return Network(layers, (sizes[0],)).eval()


def noisy_copy(model, sigma, seed, bias_only=False):
    """A copy of `model` with seeded N(0, sigma^2) noise added to every parameter (biases only
    with `bias_only`): the near-identical partner of tests and benchmarks."""
    import copy
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if not bias_only or name.endswith("bias"):
                p.add_(sigma * torch.randn(p.shape, generator=gen).to(p.dtype))
    return other
