"""Convert a chain-shaped ONNX graph into a torch `Network` that autograd and auto_LiRPA accept.

Supported: Gemm, MatMul, Add, Sub, Mul, Div (with a constant), Relu, Sigmoid, Tanh, Flatten,
Reshape, Constant, Identity, Dropout, Conv, BatchNormalization, MaxPool, AveragePool. The graph
must be a chain: every node reads the previous node's output plus constants (true of the
VNN-COMP fully connected and convolutional networks). Other graphs get one error naming every
unsupported construct.
"""
import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, UnsupportedOperationError
from .layers import Elementwise, Network, Reshape

_CONVERTERS = {}


def register_onnx_op(name):
    def wrap(fn):
        _CONVERTERS[name] = fn
        return fn
    return wrap


class _Node:
    """One ONNX node seen from the chain: its attributes, its constant inputs, and where x is."""

    def __init__(self, node, constants, rank):
        import onnx
        self.op = node.op_type
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.inputs = list(node.input)
        self.consts = [constants.get(i) for i in node.input]
        self.rank = rank  # rank of the running value without its batch dimension; None if unbatched

    def const(self, k=1):
        return self.consts[k]


def _tensor(a):
    # built in float64 (every float32/float16 value exactly), cast to the graph's own dtype at the end
    return torch.as_tensor(np.array(a, dtype=np.float64))


def _linear(weight, bias=None):
    """nn.Linear from weight [out, in]."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(_tensor(weight))
        layer.bias.copy_(_tensor(bias) if bias is not None else torch.zeros(out_f))
    return layer


@register_onnx_op("Gemm")
def _gemm(n):
    if n.attrs.get("transA", 0):
        raise ValueError("Gemm with transA")
    w = np.asarray(n.const(1)) * n.attrs.get("alpha", 1.0)
    w = w if n.attrs.get("transB", 0) else w.T
    c = n.const(2)
    return _linear(w, None if c is None else np.broadcast_to(np.asarray(c) * n.attrs.get("beta", 1.0), w.shape[:1]))


@register_onnx_op("MatMul")
def _matmul(n):
    if n.consts[1] is not None:
        return _linear(np.asarray(n.consts[1]).T)
    if n.consts[0] is not None and n.rank == 1:  # W @ x with an unbatched vector input
        return _linear(np.asarray(n.consts[0]))
    raise ValueError("MatMul needs a constant weight")


def _constant_operand(n):
    k = 1 if n.consts[1] is not None else 0
    if n.consts[k] is None:
        raise ValueError(f"{n.op} of two computed values")
    return k, np.asarray(n.consts[k], dtype=np.float64)


@register_onnx_op("Add")
def _add(n):
    _, c = _constant_operand(n)
    return Elementwise(1.0, c, dtype=torch.float64)


@register_onnx_op("Sub")
def _sub(n):
    k, c = _constant_operand(n)
    return Elementwise(1.0, -c, dtype=torch.float64) if k == 1 else Elementwise(-1.0, c, dtype=torch.float64)


@register_onnx_op("Mul")
def _mul(n):
    _, c = _constant_operand(n)
    return Elementwise(c, 0.0, dtype=torch.float64)


@register_onnx_op("Div")
def _div(n):
    k, c = _constant_operand(n)
    if k != 1:
        raise ValueError("Div of a constant by a computed value")
    return Elementwise(1.0 / c, 0.0, dtype=torch.float64)


for _name, _module in {"Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}.items():
    register_onnx_op(_name)(lambda n, _m=_module: _m())
for _name in ("Identity", "Dropout"):
    register_onnx_op(_name)(lambda n: None)


@register_onnx_op("Flatten")
def _flatten(n):
    if n.attrs.get("axis", 1) != 1:
        raise ValueError("Flatten with axis other than 1")
    return nn.Flatten()


@register_onnx_op("Reshape")
def _reshape(n):
    shape = [int(s) for s in np.asarray(n.const(1)).reshape(-1)]
    if n.rank is not None:  # the first entry is the batch dimension
        if shape[0] not in (1, -1, 0):
            raise ValueError(f"Reshape to {shape} changes the batch dimension")
        shape = shape[1:]
    return Reshape(shape)


def _pair(v, default):
    v = v if v is not None else default
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _symmetric_pads(n):
    pads = list(n.attrs.get("pads", [0, 0, 0, 0]))
    if n.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:2] != pads[2:]:
        raise ValueError("asymmetric or automatic padding")
    return tuple(pads[:2])


@register_onnx_op("Conv")
def _conv(n):
    w, b = np.asarray(n.const(1)), n.consts[2] if len(n.consts) > 2 else None
    if w.ndim != 4:
        raise ValueError("Conv that is not 2-d")
    conv = nn.Conv2d(w.shape[1] * n.attrs.get("group", 1), w.shape[0], w.shape[2:],
                     stride=_pair(n.attrs.get("strides"), 1), padding=_symmetric_pads(n),
                     dilation=_pair(n.attrs.get("dilations"), 1), groups=n.attrs.get("group", 1),
                     dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(_tensor(w))
        conv.bias.copy_(_tensor(b) if b is not None else torch.zeros(w.shape[0]))
    return conv


@register_onnx_op("BatchNormalization")
def _batchnorm(n):
    scale, bias, mean, var = (np.asarray(c, dtype=np.float64) for c in n.consts[1:5])
    # in eval mode batch norm is an affine map per channel
    factor = scale / np.sqrt(var + n.attrs.get("epsilon", 1e-5))
    shape = (-1,) + (1,) * (n.rank - 1)
    return Elementwise(factor.reshape(shape), (bias - mean * factor).reshape(shape), dtype=torch.float64)


def _pool(cls, n):
    return cls(tuple(n.attrs["kernel_shape"]), stride=_pair(n.attrs.get("strides"), 1),
               padding=_symmetric_pads(n))


register_onnx_op("MaxPool")(lambda n: _pool(nn.MaxPool2d, n))
register_onnx_op("AveragePool")(lambda n: _pool(nn.AvgPool2d, n))


MAX_VALUES = 100_000_000  # per tensor: declared sizes are checked before anything is allocated


def _declared_size(dims, what):
    size = 1
    for d in dims:
        size *= max(int(d), 1)
    if size > MAX_VALUES:
        raise CheckpointError(f"the ONNX model declares {what} of {size:.3g} values (dims {list(dims)}); "
                              f"diffprobe reads tensors of at most {MAX_VALUES:.0e} values")
    return size


def _initializer(init):
    """An initializer as an array, its declared size checked against the data it carries."""
    from onnx import numpy_helper
    size = _declared_size(init.dims, f"an initializer '{init.name}'")
    stored = (len(init.raw_data) if init.raw_data else
              max(len(init.float_data), len(init.double_data), len(init.int32_data), len(init.int64_data)))
    external = any(e.key == "location" for e in init.external_data)
    if not external and stored == 0 and size > 0:
        raise CheckpointError(f"ONNX initializer '{init.name}' declares {list(init.dims)} but holds no data")
    try:
        return numpy_helper.to_array(init)
    except Exception as exc:  # sizes that do not match the data, unknown types
        raise CheckpointError(f"ONNX initializer '{init.name}' is unreadable ({exc})") from exc


def _constants(graph):
    from onnx import numpy_helper
    consts = {i.name: _initializer(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _input_shape(graph, consts):
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise CheckpointError(f"ONNX graph has {len(inputs)} inputs; diffprobe compares single-input models")
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inputs[0].type.tensor_type.shape.dim]
    _declared_size(dims, "an input")
    return inputs[0].name, dims


def _output_rank(layer, rank):
    probe = {nn.Flatten: 1, Reshape: None}
    for cls, new in probe.items():
        if isinstance(layer, cls):
            return new if new is not None else len(layer.shape)
    return rank


def onnx_to_torch(model):
    """A `Network` computing the same function as the ONNX `model` (an onnx.ModelProto)."""
    graph = model.graph
    consts = _constants(graph)
    current, dims = _input_shape(graph, consts)
    # an input of rank 1 has no batch dimension; otherwise the first dimension is the batch
    input_shape = dims if len(dims) == 1 else dims[1:]
    rank = None if len(dims) == 1 else len(input_shape)
    layers, problems = [], []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        computed = [i for i in node.input if i and i not in consts]
        if computed != [current]:
            problems.append(f"{node.op_type} (node '{node.name or node.output[0]}' is not part of a chain)")
            continue
        current = node.output[0]
        if node.op_type not in _CONVERTERS:
            problems.append(node.op_type)
            continue
        try:
            layer = _CONVERTERS[node.op_type](_Node(node, consts, rank if rank is not None else 1))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{node.op_type} ({exc})")
            continue
        if layer is not None:
            layers.append(layer)
            rank = _output_rank(layer, rank if rank is not None else 1)
    if problems:
        raise UnsupportedOperationError(problems, what="the ONNX importer",
                                        hint="export the model as a chain of the supported ops")
    return Network(_fold_biases(layers), input_shape).to(_compute_dtype(graph, consts))


_ONNX_DTYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _compute_dtype(graph, consts):
    """The dtype the ONNX model computes in: its input's element type."""
    inputs = [i for i in graph.input if i.name not in consts]
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in _ONNX_DTYPES:
        raise CheckpointError(f"ONNX input of element type {elem}: diffprobe reads float32, float16, "
                              "bfloat16 and float64 models")
    return _ONNX_DTYPES[elem]


def _fold_biases(layers):
    """Merge `Linear` followed by a constant Add into one Linear, as exporters split them."""
    folded = []
    for layer in layers:
        prev = folded[-1] if folded else None
        if (isinstance(layer, Elementwise) and isinstance(prev, nn.Linear)
                and bool((layer.scale == 1).all()) and layer.shift.numel() in (1, prev.out_features)
                and layer.shift.dim() <= 1):
            with torch.no_grad():
                prev.bias.add_(layer.shift.reshape(-1).expand(prev.out_features))
            continue
        folded.append(layer)
    return folded
