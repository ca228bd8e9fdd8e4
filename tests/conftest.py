import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from diffprobe.layers import Network

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "nets"

warnings.filterwarnings("ignore", category=DeprecationWarning)


def shared(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared network {rel} not found beside the repository")
    return path


def mlp(sizes, seed, act=nn.ReLU, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * scale / n_in ** 0.5)
            lin.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
        layers += [lin] + ([act()] if i < len(sizes) - 2 else [])
    return Network(layers, (sizes[0],)).eval()


def shifted(model, c):
    """A copy of `model` whose outputs are all shifted by c."""
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():
        [m for m in other if isinstance(m, nn.Linear)][-1].bias.add_(c)
    return other


def examples(n):
    """Hypothesis example count; DIFFPROBE_SOUNDNESS_FACTOR=20 runs the soundness tests 20x longer."""
    import os
    return n * int(os.environ.get("DIFFPROBE_SOUNDNESS_FACTOR", "1"))


@pytest.fixture(autouse=True)
def _default_dtype_is_restored(request):
    before = torch.get_default_dtype()
    yield
    assert torch.get_default_dtype() == before, f"{request.node.nodeid} leaked default dtype"
