"""Small modules the loaders build networks from; every one is boundable by auto_LiRPA."""
import torch
from torch import nn


class Elementwise(nn.Module):
    """x * scale + shift with constant tensors (input/output normalisation, ONNX Sub/Mul/Div)."""

    def __init__(self, scale, shift, dtype=torch.float32):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=dtype))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=dtype))

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


class Permute(nn.Module):
    """Permute the dimensions of every sample (the batch dimension stays first)."""

    def __init__(self, dims):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x):
        return x.permute(0, *(d + 1 for d in self.dims))

    def extra_repr(self):
        return f"dims={self.dims}"


class Mean(nn.Module):
    """The mean over dimensions of every sample (counted without the batch dimension)."""

    def __init__(self, dims, keepdim):
        super().__init__()
        self.dims, self.keepdim = tuple(int(d) for d in dims), bool(keepdim)

    def forward(self, x):
        return x.mean(dim=tuple(d + 1 for d in self.dims), keepdim=self.keepdim)

    def extra_repr(self):
        return f"dims={self.dims}, keepdim={self.keepdim}"


class Erf(nn.Module):
    """The error function, elementwise (ONNX's Erf, as exporters write GELU)."""

    def forward(self, x):
        return torch.erf(x)
