"""The composed graph: one module that feeds the same input to both models."""
from typing import Optional, Tuple

import torch
from torch import nn

from .errors import ShapeMismatchError, UnsupportedOperationError
from .execution import batch_dependent, input_dtype, run, run_native
from .regions import Region


def _squeezed(shape):
    return tuple(s for s in shape if s != 1)


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def fit_region(region, shape):
    """The region laid out in the models' input shape (VNN-LIB boxes come flat, row-major)."""
    if tuple(region.shape) == tuple(shape):
        return region
    if _numel(region.shape) != _numel(shape):
        raise ShapeMismatchError(f"the region has shape {list(region.shape)} but the models take "
                                 f"{list(shape)}; give a region over the models' inputs")
    return region.reshape(shape)


def input_shape_of(model):
    """The shape of one input sample the model declares (an `input_shape` attribute, as the ONNX
    and NNet loaders set), or None."""
    shape = getattr(model, "input_shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def guessed_shape(model):
    """The last resort: the input width of a model whose first layer is Linear."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return None
    return None


def accepts(model, shape):
    """Whether `model` maps a batch of inputs of this per-sample shape to one output per sample (a
    batch of two, so a layer that would read the batch as channels or tokens is caught)."""
    try:
        with torch.no_grad():
            out = run_native(model, torch.zeros(2, *shape, dtype=torch.float64))
    except Exception:  # whatever a user's forward raises on a shape it does not take
        return False
    return out.dim() >= 1 and out.shape[0] == 2


def _takes(model, shape):
    """A model that declares its shape takes any layout of as many values (the pair reshapes)."""
    own = input_shape_of(model)
    return _numel(own) == _numel(shape) if own is not None else accepts(model, shape)


def common_input_shape(model_a, model_b, given=()):
    """The per-sample input shape both models take: the one they declare; else the first of
    `given` (the region's, the data's) they both accept; else a guess from the first layer. A
    mismatch names every shape tried."""
    declared = [s for s in (input_shape_of(model_a), input_shape_of(model_b)) if s is not None]
    if len(declared) == 2 and _squeezed(declared[0]) != _squeezed(declared[1]):
        raise ShapeMismatchError(f"input shapes differ: model_a takes {list(declared[0])}, model_b takes "
                                 f"{list(declared[1])}; compare models with the same input")
    guesses = [g for g in (guessed_shape(model_a), guessed_shape(model_b)) if g is not None]
    candidates = list(dict.fromkeys(declared[:1] + [tuple(g) for g in given if g is not None] + guesses))
    taken = {label: [c for c in candidates if _takes(m, c)] for label, m in (("model_a", model_a), ("model_b", model_b))}
    for shape in candidates:  # in order: declared, given, guessed
        if shape in taken["model_a"] and shape in taken["model_b"]:
            return shape
    if not candidates:
        raise ShapeMismatchError("cannot tell the models' input shape: give a region with a shape (a centre "
                                 "point, data, a VNN-LIB file) or set an input_shape attribute on the models")
    if taken["model_a"] and taken["model_b"]:
        raise ShapeMismatchError(f"input shapes differ: model_a takes {list(taken['model_a'][0])}, model_b takes "
                                 f"{list(taken['model_b'][0])}; compare models with the same input")
    raise ShapeMismatchError(f"the models do not both accept any of the input shapes "
                             f"{', '.join(str(list(c)) for c in candidates)} (the shape they declare, the "
                             "region's, their first layer's width); give a region of the models' input shape")


class Pair(nn.Module):
    """Both models on one input, each as it runs (see `execution.run_native`): the input reshaped
    to the model's own layout and cast to its input dtype, outputs in float64."""

    def __init__(self, model_a, model_b, input_shape):
        super().__init__()
        self.model_a, self.model_b = model_a, model_b
        self.input_shape = tuple(input_shape)
        self.shape_a = input_shape_of(model_a) or self.input_shape
        self.shape_b = input_shape_of(model_b) or self.input_shape
        self._refresh()

    def _refresh(self):
        self.runs = [(input_dtype(m), batch_dependent(m)) for m in (self.model_a, self.model_b)]
        tensors = list(self.parameters()) + list(self.buffers())
        self.device = tensors[0].device if tensors else None  # inputs go there, outputs come back

    def _apply(self, fn, *args, **kwargs):  # .double(), .to(...): the input dtypes follow
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    def outputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n, home = x.shape[0], x.device
        away = self.device is not None and self.device != home  # no cast node in a traced graph otherwise
        x = x.to(self.device) if away else x
        a = run(self.model_a, self._as(x, self.shape_a), *self.runs[0])
        b = run(self.model_b, self._as(x, self.shape_b), *self.runs[1])
        a, b = (a.to(home), b.to(home)) if away else (a, b)
        if a.reshape(n, -1).shape != b.reshape(n, -1).shape:
            raise ShapeMismatchError(f"output shapes differ: model_a gives {list(a.shape[1:])}, "
                                     f"model_b gives {list(b.shape[1:])}; compare models with the same outputs")
        return a.reshape(n, -1), b.reshape(n, -1)

    def _as(self, x, shape):
        # no reshape node when none is needed, so the traced graph stays minimal
        return x if tuple(x.shape[1:]) == tuple(shape) else x.reshape(x.shape[0], *shape)

    def forward(self, x):
        return self.outputs(x)


class DifferenceGraph(nn.Module):
    """x -> per-output difference, written with ops auto_LiRPA bounds (softmax as exp / sum)."""

    def __init__(self, pair, kind):
        super().__init__()
        if kind not in ("elementwise", "probability", "stacked"):
            raise UnsupportedOperationError([kind], what="the composed graph")
        self.pair, self.kind = pair, kind

    def forward(self, *inputs):  # x, and the error terms when the pair is a `bounds.NoisyPair`
        a, b = self.pair.outputs(*inputs)
        if self.kind == "stacked":
            return torch.cat([a, b], dim=1)
        if self.kind == "probability":
            a, b = _softmax(a), _softmax(b)
        return b - a


def _softmax(z):
    # torch.softmax exports with a ReduceMax that auto_LiRPA 0.3 bounds only with IBP
    e = torch.exp(z)
    return e / e.sum(dim=1, keepdim=True)


def compose(model_a: nn.Module, model_b: nn.Module, region: Optional[Region] = None) -> Pair:
    """The `Pair` of two models, checked for matching input and output shapes."""
    shape = common_input_shape(model_a, model_b, [] if region is None else [region.shape])
    if region is not None and _numel(region.shape) != _numel(shape):
        raise ShapeMismatchError(f"the region has shape {list(region.shape)} but the models take "
                                 f"{list(shape)}; give a region over the models' inputs")
    pair = Pair(model_a, model_b, shape).eval()
    with torch.no_grad():
        probe = torch.zeros(1, *shape, dtype=torch.float64)
        try:
            pair.outputs(probe)
        except RuntimeError as exc:
            raise ShapeMismatchError(f"the models do not accept inputs of shape {list(shape)}: {exc}") from exc
    return pair
