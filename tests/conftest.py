import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from diffprobe_examples.networks import random_network as mlp  # noqa: F401  (the tests import mlp from here)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "nets"

warnings.filterwarnings("ignore", category=DeprecationWarning)


def shared(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared network {rel} not found beside the repository")
    return path


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


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    """Tests that draw from torch's global generator draw the same numbers on every run."""
    torch.manual_seed(0)
