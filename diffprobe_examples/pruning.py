"""Node-pruned copies of Linear/ReLU chains: the structured pruning whose drift diffprobe certifies
(the differential engine aligns such a copy with its original, see `differential.aligned`)."""
import copy

import torch
from torch import nn


def pruned_copy(model, keep):
    """A copy of `model` (a Sequential of Linear layers and parameter-free layers) keeping, of the
    k-th Linear layer's outputs, only the neurons `keep[k]` in that order; the last Linear layer
    keeps all its outputs and every layer loses the inputs its predecessor dropped."""
    other = copy.deepcopy(model)
    linears = [i for i, m in enumerate(other) if isinstance(m, nn.Linear)]
    cols = None
    for k, i in enumerate(linears):
        lin = other[i]
        rows = torch.as_tensor(keep[k]) if k < len(linears) - 1 else torch.arange(lin.out_features)
        w = lin.weight.detach() if cols is None else lin.weight.detach()[:, cols]
        new = nn.Linear(w.shape[1], len(rows), bias=lin.bias is not None)
        with torch.no_grad():
            new.weight.copy_(w[rows])
            if lin.bias is not None:
                new.bias.copy_(lin.bias.detach()[rows])
        other[i], cols = new, rows
    return other.eval()


def prune_neurons(model, fraction):
    """`model` without the `fraction` of each hidden layer's neurons with the smallest incoming
    weight norm (measured on the inputs the previous layer kept), no retraining."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    keep, cols = [], None
    for lin in linears[:-1]:
        w = lin.weight.detach() if cols is None else lin.weight.detach()[:, cols]
        cols = w.norm(dim=1).argsort(descending=True)[:int(len(w) * (1 - fraction))].sort().values
        keep.append(cols)
    return pruned_copy(model, keep)


def magnitude_pruned(model, fraction):
    """A copy of `model` with the `fraction` of each Linear/Conv layer's weights of smallest
    magnitude set to zero, no retraining (VeryDiff's pruned pairs), by torch's own pruning."""
    from torch.nn.utils import prune
    other = copy.deepcopy(model)
    for module in other.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            prune.l1_unstructured(module, "weight", amount=fraction)
            prune.remove(module, "weight")
    return other.eval()
