"""Models whose torch.fx graph branches and joins (residual adds, concatenation, max pooling)
lowered to the chains of `diffprobe.lowering`, so every engine that reads chains bounds them.

The chain's running vector is the *state*: every value computed so far that a later node still
reads. Each node becomes one stage over the whole state: the values still needed are copied
through, the node's result is appended (a residual's skipped input rides along this way). An
activation applies to the appended neurons only, the rest pass through `IDENTITY`, which every
relaxation treats exactly. Max pooling is max(a, b) = a + relu(b - a), folded pairwise over each
window; reshapes, permutations, slices and concatenation only move values, so they are kept as
index tensors into the state and cost no stage. Error terms are the ones `lowering` gives each
module, plus one rounding per add, subtract or scale in a narrow float format.
"""
import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .activations import IDENTITY, RELU_FN, Nonlinearity, of_function
from .arithmetic import FORMATS
from .lowering import (MAX_DENSE, STAGES, Chain, Context, Declined, Stage, _activation, _affine_stage, _check_plain,
                       _LeafTracer, float_error, register_stage)

_MOVES = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
          "split", "unflatten", "cat", "concat", "stack", "getitem", "narrow", "movedim", "swapaxes"}
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.permute,
                   torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, operator.getitem,
                   torch.narrow, torch.movedim}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__"}
_NEG = {operator.neg, torch.neg, "neg"}
TOTAL_DENSE = 4 * MAX_DENSE  # float64 entries of all stage matrices of one lowered graph (800 MB)
_LINEAR_FUNCTIONS = {"mean", "sum", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d"}


@dataclass
class Value:
    """A tensor of the traced model during lowering: where each of its entries sits in the state
    (`index`, shaped like the tensor with a batch of one), the dtype it is held in."""

    index: torch.Tensor
    dtype: torch.dtype
    scale: Optional[float] = None  # quantised values: their grid (not modelled across joins)

    @property
    def shape(self):
        return self.index.shape

    def size(self, dim=None):
        return self.index.size() if dim is None else self.index.size(dim)

    def dim(self):
        return self.index.dim()


class _State:
    """The running state and the steps built so far."""

    def __init__(self, input_shape):
        self.size, self.steps, self.entries = math.prod(input_shape), [], 0

    def _add(self, stage, name):
        """Append a stage, within a budget for all of the graph's matrices together (each node's
        is as wide as the state, so a large network would otherwise take gigabytes)."""
        self.entries += 0 if stage.weight is None else stage.weight.numel()
        if self.entries > TOTAL_DENSE:
            raise Declined(f"lowering the graph up to '{name}' needs more than {TOTAL_DENSE:,} matrix entries")
        self.steps.append(stage)

    def apply(self, value_steps, inputs, keep, out_shape, name):
        """Append `value_steps` (per-value stages and nonlinearities of `lowering`) applied to the
        state entries `inputs` (flat), copying the entries `keep` through; returns the result's
        index and the map old position -> new position of the kept entries."""
        n_keep = len(keep)
        moved = torch.full((self.size,), -1, dtype=torch.long)
        moved[keep] = torch.arange(n_keep)
        source = inputs  # until a step reads them: the entries the value's steps start from
        for step in value_steps:
            if isinstance(step, Nonlinearity):
                if source is not None:  # the activation's input gets its own neurons first
                    self._select(keep, source, name)
                    source = None
                self.steps.append(_widened(step, n_keep, self.size))
                continue
            if source is not None and step.input_error is not None:
                self._select(keep, source, name)
                source = None
            columns = source if source is not None else torch.arange(n_keep, self.size)
            rows = keep if source is not None else torch.arange(n_keep)
            self._add(_embedded(step, rows, columns, self.size, name), name)
            self.size = n_keep + _width(step, len(columns))
            source = None
        if source is not None:  # no step at all: the value itself, selected
            self._select(keep, source, name)
        out = torch.arange(n_keep, self.size)
        if math.prod(out_shape) != len(out):
            raise Declined(f"'{name}' gives {len(out)} values, its traced shape {tuple(out_shape)}")
        return out.reshape(1, *out_shape), moved

    def _select(self, keep, source, name):
        rows = torch.cat([keep, source])
        w = torch.zeros(len(rows), self.size, dtype=torch.float64)
        w[torch.arange(len(rows)), rows] = 1.0
        self._add(Stage(name + " (select)", w, None, (len(rows),)), name)
        self.size = len(rows)


def _width(stage, n_in):
    return n_in if stage.weight is None else stage.weight.shape[0]


def _embedded(stage, rows, columns, size, name):
    """`stage` (on one value) as a stage over the whole state: the entries `rows` copied through,
    the stage applied to the entries `columns`, its result appended; errors on the result only."""
    n_keep, n_in = len(rows), len(columns)
    w_value = stage.weight if stage.weight is not None else torch.eye(n_in, dtype=torch.float64)
    n_out = len(w_value)
    if (n_keep + n_out) * size > MAX_DENSE:
        raise Declined(f"lowering '{name}' would need a {n_keep + n_out}x{size} matrix")
    w = torch.zeros(n_keep + n_out, size, dtype=torch.float64)
    w[torch.arange(n_keep), rows] = 1.0
    w[n_keep:].index_add_(1, columns, w_value)
    bias = None if stage.bias is None else torch.cat([torch.zeros(n_keep, dtype=torch.float64), stage.bias])
    return Stage(stage.name, w, bias, (n_keep + n_out,), _tail_input_error(stage.input_error, n_keep),
                 _tail_output_error(stage.output_error, columns, n_keep))


def _tail_input_error(fn, n_keep):
    """A value's input error on the tail of the state (the value was selected there first)."""
    if fn is None:
        return None
    return lambda lo, hi: torch.cat([torch.zeros_like(lo[:, :n_keep]), fn(lo[:, n_keep:], hi[:, n_keep:])], 1)


def _tail_output_error(fn, columns, n_keep):
    """A value's output error on the appended entries; the kept entries are exact copies."""
    if fn is None:
        return None
    return lambda x_lo, x_hi, y_lo, y_hi: torch.cat(
        [torch.zeros_like(y_lo[:, :n_keep]), fn(x_lo[:, columns], x_hi[:, columns], y_lo[:, n_keep:], y_hi[:, n_keep:])], 1)



def _widened(nonlinearity, n_keep, size):
    """A nonlinearity on the appended entries of a state of `size` (the kept ones pass through)."""
    parts = [(IDENTITY, None)]
    for activation, mask in nonlinearity.parts:
        full = torch.zeros(size, dtype=torch.bool)
        full[n_keep:] = True if mask is None else mask
        parts.append((activation, full))
    return Nonlinearity(tuple(parts))


def lower_graph(model, input_shape, exact=False):
    """The `Chain` of a model whose fx graph branches and joins; raises `Declined` naming the
    first node it cannot lower."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    last_use = {n: max((nodes.index(u) for u in n.users), default=-1) for n in nodes}
    state = _State(input_shape)
    env, inputs = {}, [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise Declined(f"{type(model).__name__} takes {len(inputs)} inputs")
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = Value(torch.arange(state.size).reshape(1, *input_shape), torch.float64)
        elif node.op == "get_attr":
            env[node] = _attribute(model, node.target)
        elif node.op == "output":
            out = env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
            if not isinstance(out, Value):
                raise Declined(f"{type(model).__name__} does not return one tensor")
            keep = torch.empty(0, dtype=torch.long)
            stage = Stage("output", None, None, tuple(out.shape[1:]))
            state.apply([stage], out.index.reshape(-1), keep, out.shape[1:], "output")
            state.steps[-1].shape = tuple(out.shape[1:])
        else:
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            live = [env[n] for n in nodes[:i] if last_use[n] > i and isinstance(env.get(n), (Value, tuple, list))]
            env[node] = _node_value(node, args, kwargs, modules, state, live, exact)
            if isinstance(env[node], _Applied):  # a stage was added: every live value moves
                moved = env[node].moved
                for n in list(env):
                    if n is not node:
                        env[n] = _moved(env[n], moved)
                env[node] = env[node].value
    return Chain(state.steps, tuple(input_shape))


@dataclass
class _Applied:
    value: Value
    moved: torch.Tensor


def _moved(obj, moved):
    if isinstance(obj, Value):
        return Value(moved[obj.index], obj.dtype, obj.scale)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(o, moved) for o in obj)
    return obj


def _positions(objs):
    out = []
    for obj in objs:
        if isinstance(obj, Value):
            out.append(obj.index.reshape(-1))
        elif isinstance(obj, (tuple, list)):
            out.append(_positions(obj))
    return torch.cat(out).unique() if out else torch.empty(0, dtype=torch.long)


def _attribute(model, target):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if torch.is_tensor(obj) else obj


def _tensors(args):
    return [a for a in args if isinstance(a, Value)]


def _node_value(node, args, kwargs, modules, state, live, exact):
    """What `node` computes: a moved `Value` (no stage), a python value (shape queries), or an
    `_Applied` after adding its stages."""
    name, target = node.name, node.target
    if node.op == "call_module":
        module = modules[target]
        _check_plain(target, module)
        value = args[0]
        if not isinstance(value, Value) or len(_tensors(args)) != 1 or kwargs:
            raise Declined(f"{target} ({type(module).__name__}) is called with other than one tensor")
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            return _max_pool(value, module.kernel_size, module.stride, module.padding, module.dilation,
                             module.ceil_mode, target, state, live)
        builder = STAGES.get(type(module))
        if builder is None:
            raise Declined(f"{target} ({type(module).__module__}.{type(module).__name__}) is not a module "
                           "diffprobe lowers")
        return _through(lambda ctx: builder(module, ctx), value, target, state, live, exact)
    label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if node.op == "call_method" and target in ("size", "dim") or label == "getattr":
        return _evaluate(node, args, kwargs)
    if label == "getitem" and not isinstance(args[0], Value):
        return args[0][args[1]]
    activation = of_function(target, args, kwargs)
    if activation is not None:
        return _through(lambda ctx: _activation(activation, ctx), args[0], name, state, live, exact)
    if label in _MOVES or target in _MOVE_FUNCTIONS:
        return _move(node, args, kwargs)
    if target in _ADD | _SUB | _MUL | _DIV | _NEG or label in _ADD | _SUB | _MUL | _DIV | _NEG:
        return _arithmetic(target if not isinstance(target, str) else label, args, kwargs, name, state, live, exact)
    if label in _LINEAR_FUNCTIONS and len(_tensors(args)) == 1 and isinstance(args[0], Value):
        fn = target if not isinstance(target, str) else (lambda x, *a, **k: getattr(x, label)(*a, **k))
        module = _Function(fn, args[1:], kwargs)
        return _through(lambda ctx: STAGES[_Function](module, ctx), args[0], name, state, live, exact)
    if label == "max_pool2d" or label == "max_pool1d":
        p = _pool_args(args, kwargs)
        return _max_pool(args[0], *p, name, state, live)
    raise Declined(f"'{name}' ({node.op} {label}) is not an operation diffprobe lowers")


def _evaluate(node, args, kwargs):
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _move(node, args, kwargs):
    """A rearrangement: applied to the index tensors, no stage. Several tensors (cat, stack) must
    agree in dtype."""
    tensors = [t for t in _flat(args) if isinstance(t, Value)]
    if not tensors:
        raise Declined(f"'{node.name}' moves no tensor")
    as_index = lambda o: o.index if isinstance(o, Value) else o
    a = torch.fx.node.map_aggregate(args, as_index)
    k = torch.fx.node.map_aggregate(kwargs, as_index)
    result = getattr(a[0], node.target)(*a[1:], **k) if node.op == "call_method" else node.target(*a, **k)
    dtype, scale = tensors[0].dtype, tensors[0].scale
    if any(t.dtype != dtype or t.scale != scale for t in tensors):
        raise Declined(f"'{node.name}' joins tensors held in different dtypes")
    wrap = lambda r: Value(r, dtype, scale) if torch.is_tensor(r) else type(r)(wrap(x) for x in r)
    return wrap(result)


def _flat(obj):
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in _flat(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flat(o)]
    return [obj]


def _through(build, value, name, state, live, exact):
    """A module or function of one tensor: its steps from the lowering registry, on that tensor."""
    if not isinstance(value, Value):
        raise Declined(f"'{name}' is applied to something other than a tensor")
    shape = tuple(value.shape[1:])
    ctx = Context(shape, value.dtype, name, scale=value.scale, exact=exact)
    steps = build(ctx)
    index, moved = state.apply(steps, value.index.reshape(-1), _positions(live), ctx.shape, name)
    return _Applied(Value(index, ctx.dtype, ctx.scale), moved)


class _Function(nn.Module):
    """A linear function call (mean, avg_pool2d, ...) as a module, for `lowering.dense`."""

    def __init__(self, fn, args, kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)


@register_stage(_Function)
def _function_stage(module, ctx):
    return _affine_stage(module, ctx, extra_roundings=1)


def _arithmetic(op, args, kwargs, name, state, live, exact):
    """x + y, x - y, x + c, c * x, x / c, -x (tensors x, y of one shape; constants c broadcast)."""
    tensors = _tensors(args)
    if op in _NEG or op == "neg":
        return _linear_join([tensors[0]], [-1.0], 0.0, name, state, live, exact)
    if len(args) != 2 or kwargs.get("alpha", 1) != 1:
        raise Declined(f"'{name}' is not a plain binary operation")
    x, y = args
    if isinstance(x, Value) and isinstance(y, Value):
        if op in _MUL or op in _DIV:
            raise Declined(f"'{name}' multiplies two computed tensors: not linear")
        if x.shape != y.shape:
            raise Declined(f"'{name}' broadcasts {tuple(x.shape)} against {tuple(y.shape)}")
        return _linear_join([x, y], [1.0, -1.0 if op in _SUB else 1.0], 0.0, name, state, live, exact)
    value, const = (x, y) if isinstance(x, Value) else (y, x)
    const = const.double() if torch.is_tensor(const) else float(const)
    if op in _ADD:
        return _linear_join([value], [1.0], const, name, state, live, exact)
    if op in _SUB:
        return (_linear_join([value], [1.0], -const, name, state, live, exact) if value is x
                else _linear_join([value], [-1.0], const, name, state, live, exact))
    if op in _MUL:
        return _linear_join([value], [const], 0.0, name, state, live, exact)
    if value is x:
        return _linear_join([value], [1.0 / const if not torch.is_tensor(const) else 1.0 / const], 0.0, name,
                            state, live, exact)
    raise Declined(f"'{name}' divides by a computed tensor: not linear")


def _linear_join(values, scales, shift, name, state, live, exact):
    """sum_i scales_i * values_i + shift (elementwise, constants broadcast), rounded once in the
    values' format."""
    shape = tuple(values[0].shape[1:])
    dtypes = {v.dtype for v in values}
    if any(v.scale is not None for v in values) or len(dtypes) != 1:
        raise Declined(f"'{name}' joins quantised tensors or tensors of different dtypes")
    blocks = [torch.diag(torch.broadcast_to(torch.as_tensor(s, dtype=torch.float64), shape).reshape(-1))
              for s in scales]
    w = torch.cat(blocks, 1)
    bias = torch.broadcast_to(torch.as_tensor(shift, dtype=torch.float64), shape).reshape(-1).clone()
    fmt = FORMATS.get(values[0].dtype)
    error = None if exact or fmt is None or fmt.bits >= 53 else float_error(fmt, w, bias)
    stage = Stage(name, w, bias, shape, output_error=error)
    sources = torch.cat([v.index.reshape(-1) for v in values])
    index, moved = state.apply([stage], sources, _positions(live), shape, name)
    return _Applied(Value(index, values[0].dtype), moved)


def _pool_args(args, kwargs):
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    given = dict(zip(names, args[1:]), **{k: v for k, v in kwargs.items() if k in names})
    if kwargs.get("return_indices"):
        raise Declined("max pooling that returns indices")
    return tuple(given.get(k, defaults.get(k)) for k in names)


def _windows(shape, kernel, stride, padding, dilation, ceil_mode, name):
    """Per output of a max pooling over a value of per-sample `shape`, the flat input positions
    of its window [n_out, k] (padding, which never wins a max, left out by repeating a member),
    and the output's per-sample shape."""
    if ceil_mode:
        raise Declined(f"'{name}' pools with ceil_mode")
    one_d = len(shape) == 2
    pool = nn.functional.max_pool1d if one_d else nn.functional.max_pool2d
    stride = stride if stride not in (None, [], ()) else kernel
    out_shape = tuple(pool(torch.zeros(1, *shape), kernel, stride, padding, dilation).shape[1:])
    as_pair = lambda v, fill: (fill, int(v[0] if isinstance(v, (tuple, list)) else v)) if one_d else (
        tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v)))
    kernel, stride, padding, dilation = (as_pair(kernel, 1), as_pair(stride, 1), as_pair(padding, 0),
                                         as_pair(dilation, 1))
    c, h, w = (shape[0], 1, shape[1]) if one_d else shape
    index = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w)
    index = nn.functional.pad(index, (padding[1], padding[1], padding[0], padding[0]), value=-1.0)
    cols = nn.functional.unfold(index, kernel, dilation=dilation, stride=stride)  # [1, c k, L]
    windows = cols.reshape(c, kernel[0] * kernel[1], -1).permute(0, 2, 1).reshape(-1, kernel[0] * kernel[1]).long()
    windows = torch.where(windows < 0, windows.max(1, keepdim=True).values, windows)
    if len(windows) != math.prod(out_shape):
        raise Declined(f"'{name}': {len(windows)} pooling windows for an output of shape {out_shape}")
    return windows, out_shape


def _max_pool(value, kernel, stride, padding, dilation, ceil_mode, name, state, live):
    """max over each window as a + relu(b - a) folded pairwise (exact in every float format)."""
    if value.scale is not None:
        raise Declined(f"'{name}' max-pools quantised values")
    shape = tuple(value.shape[1:])
    windows, out_shape = _windows(shape, kernel, stride, padding, dilation, ceil_mode, name)
    steps, width, members = [], math.prod(shape), windows  # members: positions in the current tail
    while members.shape[1] > 1:
        pairs = members.shape[1] // 2
        a, b, odd = members[:, 0:2 * pairs:2], members[:, 1:2 * pairs:2], members[:, 2 * pairs:]
        n_a, n_odd = a.numel(), odd.numel()
        w = torch.cat([_one_hot(a, width), _one_hot(b, width) - _one_hot(a, width), _one_hot(odd, width)])
        steps.append(Stage(name + " (max: differences)", w, None, (len(w),)))
        mask = torch.zeros(len(w), dtype=torch.bool)
        mask[n_a:2 * n_a] = True
        steps.append(Nonlinearity(((IDENTITY, None), (RELU_FN, mask))))
        fold = torch.zeros(n_a + n_odd, len(w), dtype=torch.float64)  # a + relu(b - a); odd ones carried on
        fold[torch.arange(n_a), torch.arange(n_a)] = 1.0
        fold[torch.arange(n_a), n_a + torch.arange(n_a)] = 1.0
        fold[n_a + torch.arange(n_odd), 2 * n_a + torch.arange(n_odd)] = 1.0
        steps.append(Stage(name + " (max: fold)", fold, None, (n_a + n_odd,)))
        width = n_a + n_odd
        rest = [n_a + torch.arange(n_odd).reshape(len(members), -1)] if n_odd else []
        members = torch.cat([torch.arange(n_a).reshape(len(members), pairs)] + rest, 1)
    index, moved = state.apply(steps, value.index.reshape(-1), _positions(live), out_shape, name)
    return _Applied(Value(index, value.dtype), moved)


def _one_hot(positions, width):
    """Rows selecting `positions` (flattened) from a vector of `width`."""
    return nn.functional.one_hot(positions.reshape(-1), width).to(torch.float64)
