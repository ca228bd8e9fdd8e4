"""Read the NNet text format of ACAS Xu, Reluplex, ReluDiff and NeuroDiff."""
import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .layers import Elementwise, Network


def _numbers(line):
    return [float(v) for v in line.replace(",", " ").split()]


def read_nnet(path, *, normalize=False):
    """The network of an .nnet file, in normalised coordinates unless `normalize`.

    With `normalize=True` the returned module takes raw inputs and returns raw outputs
    ((x - mean) / range in front, y * range + mean behind), as the file's header describes.
    """
    try:
        with open(path) as handle:
            lines = [l for l in handle if l.strip() and not l.lstrip().startswith("//")]
        num_layers, n_in, n_out, _ = (int(v) for v in _numbers(lines[0])[:4])
        sizes = [int(v) for v in _numbers(lines[1])[: num_layers + 1]]
        means, ranges = _numbers(lines[5]), _numbers(lines[6])
        values = np.array([v for l in lines[7:] for v in _numbers(l)], dtype=np.float64)
    except (OSError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable NNet file ({exc})") from exc
    if sizes[0] != n_in or sizes[-1] != n_out:
        raise CheckpointError(f"{path}: layer sizes {sizes} do not match {n_in} inputs / {n_out} outputs")
    layers, offset = [], 0
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        count = fan_in * fan_out + fan_out
        if offset + count > values.size:
            raise CheckpointError(f"{path}: file ends inside layer {k + 1}; it is truncated")
        linear = nn.Linear(fan_in, fan_out, dtype=torch.float64)  # decimal text: float64 keeps it
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(values[offset:offset + fan_in * fan_out].reshape(fan_out, fan_in)))
            linear.bias.copy_(torch.from_numpy(values[offset + fan_in * fan_out:offset + count]))
        offset += count
        layers += [linear, nn.ReLU()] if k < len(sizes) - 2 else [linear]
    if normalize:
        # a range of 0 is a placeholder in some files (ReluDiff's toys): it means no scaling
        mean, rng = np.array(means[:n_in]), np.array([r or 1.0 for r in ranges[:n_in]])
        layers = ([Elementwise(1 / rng, -mean / rng, dtype=torch.float64)] + layers
                  + [Elementwise(ranges[-1] or 1.0, means[-1], dtype=torch.float64)])
    return Network(layers, (n_in,))
