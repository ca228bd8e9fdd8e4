"""Convert an ONNX graph into a torch module that autograd and auto_LiRPA accept.

A chain (every node reads the previous node's output plus constants: the VNN-COMP fully
connected and convolutional networks) becomes a `Network` (an nn.Sequential); a graph with
branches (residual adds, concatenations, attention) becomes a torch.fx GraphModule of the same
modules plus the joins. Supported: Gemm, MatMul (with a constant, or of two computed values), Add,
Sub, Mul, Div, Relu, LeakyRelu, Sigmoid, Tanh, Erf, Gelu, Softmax, LayerNormalization, Flatten,
Reshape, Squeeze, Unsqueeze, Transpose (the batch dimension kept first), Concat, Constant,
Identity, Dropout, Conv, Pad (zeros), BatchNormalization, MaxPool, AveragePool, GlobalAveragePool,
ReduceMean.
Anything else gets one error naming every unsupported construct and where it is.
"""
import operator
from typing import Callable, Dict

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, UnsupportedOperationError
from .layers import Elementwise, Erf, Mean, Network, Permute, Reshape

_CONVERTERS: Dict[str, Callable] = {}  # ONNX op type -> converter(node) -> Layer


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
        self.shape = None  # its per-sample shape, where known

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


for _name, _module in {"Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "Erf": Erf}.items():
    register_onnx_op(_name)(lambda n, _m=_module: _m())
register_onnx_op("LeakyRelu")(lambda n: nn.LeakyReLU(n.attrs.get("alpha", 0.01)))
register_onnx_op("Gelu")(lambda n: nn.GELU(approximate=_text(n.attrs.get("approximate", b"none"))))


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _sample_axis(n, axis):
    """An ONNX axis (batch dimension first) as a per-sample one; the batch axis itself is refused."""
    axis = axis if axis >= 0 else axis + n.rank + 1
    if axis == 0:
        raise ValueError("acts across the batch dimension")
    return axis - 1


@register_onnx_op("Softmax")
def _softmax(n):
    return nn.Softmax(dim=_sample_axis(n, n.attrs.get("axis", -1)) + 1)  # it sees the batched tensor


@register_onnx_op("LayerNormalization")
def _layer_norm(n):
    weight = np.asarray(n.const(1))
    bias = n.consts[2] if len(n.consts) > 2 else None
    if _sample_axis(n, n.attrs.get("axis", -1)) != n.rank - weight.ndim:
        raise ValueError("normalises other dimensions than its scale's")
    norm = nn.LayerNorm(weight.shape, eps=n.attrs.get("epsilon", 1e-5), dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(_tensor(weight))
        norm.bias.copy_(_tensor(bias) if bias is not None else torch.zeros(weight.shape))
    return norm


@register_onnx_op("Transpose")
def _transpose(n):
    perm = list(n.attrs["perm"])
    if perm[0] != 0:
        raise ValueError(f"moves the batch dimension (perm {perm}); export with batch-first layouts")
    return Permute([p - 1 for p in perm[1:]])


@register_onnx_op("GlobalAveragePool")
def _global_pool(n):
    return (nn.AdaptiveAvgPool1d if n.rank == 2 else nn.AdaptiveAvgPool2d)(1)


@register_onnx_op("ReduceMean")
def _reduce_mean(n):
    axes = n.attrs.get("axes", None)
    if axes is None:
        axes = n.consts[1] if len(n.consts) > 1 and n.consts[1] is not None else range(n.rank + 1)
    return Mean([_sample_axis(n, int(a)) for a in np.asarray(axes).reshape(-1)], n.attrs.get("keepdims", 1))


def _axes_reshape(n, squeeze):
    axes = n.attrs.get("axes", None)
    axes = np.asarray(axes if axes is not None else n.consts[1]).reshape(-1)
    shape = list(n.shape)
    if squeeze:
        keep = [d for i, d in enumerate(shape) if i not in {_sample_axis(n, int(a)) for a in axes}]
        return Reshape(keep)
    for a in sorted(int(a) if a >= 0 else int(a) + n.rank + 1 + len(axes) for a in axes):
        if a == 0:
            raise ValueError("adds a dimension before the batch")
        shape.insert(a - 1, 1)
    return Reshape(shape)


@register_onnx_op("Pad")
def _pad(n):
    """Zero padding of the last one or two dimensions (how convolution exports pad)."""
    mode = _text(n.attrs.get("mode", b"constant"))
    pads = n.attrs.get("pads", None)
    pads = list(np.asarray(pads if pads is not None else n.const(1)).reshape(-1))
    value = n.consts[2] if len(n.consts) > 2 and n.consts[2] is not None else 0
    if mode != "constant" or float(np.asarray(value).reshape(-1)[0] if np.size(value) else 0) != 0:
        raise ValueError(f"{mode} padding with value {value}: only zero padding is read")
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    if any(begin[:-2]) or any(end[:-2]):
        raise ValueError("pads the batch or channel dimension")
    return nn.ZeroPad2d((int(begin[-1]), int(end[-1]), int(begin[-2]), int(end[-2])))


register_onnx_op("Squeeze")(lambda n: _axes_reshape(n, squeeze=True))
register_onnx_op("Unsqueeze")(lambda n: _axes_reshape(n, squeeze=False))
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


def graph_input(model):
    """The name and dims (unknown ones as 1) of an ONNX model's one real input (old exports list
    their weights as inputs too)."""
    return _input_shape(model.graph, _constants(model.graph))


def onnx_to_torch(model):
    """A module computing the same function as the ONNX `model` (an onnx.ModelProto): a `Network`
    when the graph is a chain, else a torch.fx GraphModule; either has `input_shape`."""
    graph = model.graph
    consts = _constants(graph)
    current, dims = _input_shape(graph, consts)
    # an input of rank 1 has no batch dimension; otherwise the first dimension is the batch
    input_shape = dims if len(dims) == 1 else dims[1:]
    builder = _Builder(current, input_shape, batched=len(dims) > 1)
    for node in graph.node:
        if node.op_type != "Constant":
            builder.add(node, consts)
    if builder.problems:
        raise UnsupportedOperationError(builder.problems, what="the ONNX importer",
                                        hint="export the model with the supported ops")
    outputs = [o.name for o in graph.output]
    if len(outputs) != 1 or outputs[0] not in builder.values:
        raise CheckpointError(f"the ONNX graph has {len(outputs)} outputs or an output no node computes; "
                              "diffprobe compares single-output models")
    return builder.module(outputs[0]).to(_compute_dtype(graph, consts))


def _as_initializer(name, value):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(value), name)


class _Builder:
    """Collects the graph's nodes as modules and joins, each run on a probe so every value's
    per-sample shape is known; a chain becomes a `Network`, anything else an fx GraphModule."""

    _JOINS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
              "MatMul": operator.matmul}

    def __init__(self, name, input_shape, batched):
        self.input_name, self.input_shape, self.batched = name, tuple(input_shape), batched
        self.graph, self.root = torch.fx.Graph(), nn.Module()
        self.values = {name: self.graph.placeholder("x")}
        self.probes = {name: torch.zeros(1, *input_shape, dtype=torch.float64)}
        self.layers, self.chain, self.last, self.problems, self.failed = [], True, name, [], set()

    def add(self, node, consts):
        where = f"{node.op_type} (node '{node.name or node.output[0]}')"
        if self._folded(node, consts):
            return
        computed = [i for i in node.input if i and i not in consts]
        if any(i in self.failed for i in computed):  # already reported where it failed
            self.failed.update(node.output)
            return
        if any(i not in self.values for i in computed):
            self.problems.append(f"{where} reads a value no earlier node computes")
            return
        count = len(self.problems)
        try:
            if len(computed) == 1 and node.op_type in _CONVERTERS:
                self._module(node, consts, computed[0])
            elif node.op_type in self._JOINS and len(computed) == 2:
                self._join(self._JOINS[node.op_type], computed, node.output[0])
            elif node.op_type == "Concat" and len(computed) == len([i for i in node.input if i]):
                axis = _Node(node, consts, len(self.probes[computed[0]].shape) - 1).attrs.get("axis", 0)
                if axis == 0 or axis == -len(self.probes[computed[0]].shape):
                    raise ValueError("concatenates along the batch dimension")
                self._join(torch.cat, computed, node.output[0], axis=axis, as_list=True)
            else:
                self.problems.append(node.op_type if node.op_type not in _CONVERTERS and
                                     node.op_type not in self._JOINS else f"{where} with this mix of inputs")
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            self.problems.append(f"{where} ({exc})")
        if len(self.problems) > count:
            self.failed.update(node.output)

    def _folded(self, node, consts):
        """Shape arithmetic becomes constants: Shape of a computed value is its shape with a batch of
        1 (which Reshape reads as the batch), and a node of constants only is evaluated."""
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" and inputs and inputs[0] in self.probes:
            attrs = {a.name: a.i for a in node.attribute}
            shape = np.array(self.probes[inputs[0]].shape, dtype=np.int64)
            consts[node.output[0]] = shape[attrs.get("start", 0):attrs.get("end", len(shape))]
            return True
        if not inputs or any(i not in consts for i in inputs):
            return False
        try:
            from onnx import helper
            from onnx.reference import ReferenceEvaluator
            single = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
                                       [_as_initializer(i, consts[i]) for i in inputs])
            results = ReferenceEvaluator(helper.make_model(single)).run(None, {})
        except Exception:  # not foldable: handled (or refused) as an operation
            return False
        consts.update(zip(node.output, results))
        return True

    def _module(self, node, consts, source):
        probe = self.probes[source]
        n = _Node(node, consts, probe.dim() - 1 if self.batched else 1)
        n.shape = tuple(probe.shape[1:])
        layer = _CONVERTERS[node.op_type](n)
        out = node.output[0]
        if layer is None:  # Identity, Dropout: the same value under another name
            self.values[out], self.probes[out] = self.values[source], probe
        else:
            name = f"n{len(self.layers)}"
            self.root.add_module(name, layer)
            self.layers.append(layer)
            self.values[out] = self.graph.call_module(name, (self.values[source],))
            with torch.no_grad():
                self.probes[out] = layer.double()(probe)
        self.chain = self.chain and source == self.last
        self.last = out

    def _join(self, fn, sources, out, axis=None, as_list=False):
        args = [self.values[s] for s in sources]
        probes = [self.probes[s] for s in sources]
        if as_list:
            node, probe = self.graph.call_function(fn, (args,), {"dim": axis}), fn(probes, dim=axis)
        else:
            node, probe = self.graph.call_function(fn, tuple(args)), fn(*probes)
        if probe.shape[0] != 1:
            raise ValueError("changes the batch dimension")
        self.values[out], self.probes[out] = node, probe
        self.chain, self.last = False, out

    def module(self, output):
        if self.chain and output == self.last:
            return Network(_fold_biases(self.layers), self.input_shape)
        self.graph.output(self.values[output])
        module = torch.fx.GraphModule(self.root, self.graph)
        module.input_shape = self.input_shape
        return module


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
