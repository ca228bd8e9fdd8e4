"""Small modules the loaders build networks from; every one is boundable by auto_LiRPA."""
import torch
from torch import nn


class Elementwise(nn.Module):
    """x * scale + shift with constant tensors (input/output normalisation, ONNX Sub/Mul/Div)."""

    def __init__(self, scale, shift):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))

    def forward(self, x):
        return x * self.scale + self.shift


class Reshape(nn.Module):
    """Reshape every sample to `shape`, keeping the batch dimension."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self):
        return f"shape={self.shape}"


class Network(nn.Sequential):
    """A feed-forward chain that knows the shape of one input sample (without batch)."""

    def __init__(self, layers, input_shape):
        super().__init__(*layers)
        self.input_shape = tuple(int(s) for s in input_shape)
