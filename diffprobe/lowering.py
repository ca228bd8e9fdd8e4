"""A model lowered to what it computes: a chain of affine stages and ReLUs in float64, each stage
with a bound on how far the deployed module's result can be from it (rounding, quantisation).

Bound methods that read a model's weights (the differential engine, the MILP oracle, the composed
graph in deployed arithmetic) work on this form, never on `.weight` attributes directly: a module
is lowered only when its exact type is known (an `nn.Linear` subclass that adds a LoRA term in its
`forward` is not an `nn.Linear`), it has no hooks or parametrisations, and the lowered chain
reproduces the module's outputs on sample inputs (`Chain.check`). Anything else is declined with
a `Declined` naming the module, and callers fall back to methods that trace `forward`.

A chain is found in an `nn.Sequential` (nested ones included) or, for any other module, in its
torch.fx graph when that graph is a chain. Per-module lowering lives in the `STAGES` registry
(`register_stage`); quantised modules register theirs in `diffprobe.quantized`, which the callers
(`deployment`, `milp`) import.
"""
import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import nn

from .activations import Activation, Nonlinearity, of_function, of_module
from .arithmetic import FORMATS, dot_error, format_of, function_error
from .execution import input_dtype, is_quantized, run_native
from .layers import Elementwise, Network, Reshape

MAX_DENSE = 25_000_000  # entries of one lowered matrix (200 MB in float64)


class Declined(Exception):
    """The model cannot be lowered; the message names the module and why."""


class NotAChain(Declined):
    """The model's graph branches or joins: `diffprobe.dag` lowers it."""


@dataclass
class Stage:
    """y = W x + b on one flattened sample (W None: the identity), and how far the deployed
    module's y can be from it: `input_error(lo, hi)` bounds a perturbation of x before W (a cast,
    activation quantisation), `output_error(x_lo, x_hi, y_lo, y_hi)` the error of y itself
    (accumulation, rounding, requantisation); both get per-box bounds [B, n] and return radii."""

    name: str
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    shape: tuple  # per-sample output shape
    input_error: Optional[Callable] = None
    output_error: Optional[Callable] = None

    def exact(self, x):
        x = x if self.weight is None else x @ self.weight.T
        return x if self.bias is None else x + self.bias

    def interval(self, lo, hi):
        if self.weight is None:
            return (lo, hi) if self.bias is None else (lo + self.bias, hi + self.bias)
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        center = mid @ self.weight.T + (0 if self.bias is None else self.bias)
        spread = rad @ self.weight.abs().T
        return center - spread, center + spread

    @property
    def noisy(self):
        return self.input_error is not None or self.output_error is not None


@dataclass
class Context:
    """What lowering the next module needs to know: the running value's per-sample shape, the
    dtype it is held in, the scale of its quantisation grid (if quantised), the module's name."""

    shape: tuple
    dtype: torch.dtype
    name: str = ""
    scale: Optional[float] = None
    exact: bool = False  # exact arithmetic: no error terms at all
    batch_independent: bool = True
    notes: list = field(default_factory=list)


STAGES: Dict[type, Callable] = {}
OBSERVED: Set[type] = set()  # module types whose stage also lowers torch.ao's observer / fake-quant hooks


def register_stage(*types):
    """Register `fn(module, ctx) -> [Stage | Nonlinearity, ...]` (updating ctx) for modules of exactly
    these types (subclasses are not covered: they may compute something else)."""
    def wrap(fn):
        for t in types:
            STAGES[t] = fn
        return fn
    return wrap


# --- float modules -------------------------------------------------------------------------------

def dense(module, shape):
    """(W, b, output shape) of an affine `module` on per-sample inputs of `shape`, in float64: a
    Linear layer's own weights, otherwise its responses to zero and to every unit vector."""
    if type(module) is nn.Linear and len(shape) == 1:
        w = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else torch.zeros(len(w), dtype=torch.float64)
        return w, b, (len(w),)
    n = math.prod(shape)
    module = copy.deepcopy(module).double()
    with torch.no_grad():
        b = module(torch.zeros(1, *shape, dtype=torch.float64))
        if n * b.numel() > MAX_DENSE:
            raise Declined(f"lowering {type(module).__name__} would need a {b.numel()}x{n} matrix")
        w = module(torch.eye(n, dtype=torch.float64).reshape(n, *shape)) - b
    return w.reshape(n, -1).T.contiguous(), b.reshape(-1), tuple(b.shape[1:])


def float_error(fmt, weight, bias, extra_roundings=0, abs_bias=None):
    """`Stage.output_error` of y = W x + b computed in float format `fmt` (accumulated in its
    accumulator format in any order, `extra_roundings` more operations per output, e.g. batch
    norm's subtract-scale-shift). `abs_bias` bounds the constant part's magnitude if |b| does not."""
    absw = weight.abs()
    terms = (weight != 0).sum(1).to(torch.float64)
    abs_bias = bias.abs() if abs_bias is None else abs_bias

    def error(x_lo, x_hi, y_lo, y_hi):
        magnitude = torch.maximum(x_lo.abs(), x_hi.abs())
        return dot_error(fmt, terms, magnitude @ absw.T + abs_bias, torch.maximum(y_lo.abs(), y_hi.abs()),
                         extra_roundings)
    return error


def cast_error(fmt):
    """`Stage.input_error` of casting a value to `fmt`."""
    return lambda lo, hi: fmt.rounding_error(torch.maximum(lo.abs(), hi.abs()))


def _param_dtype(module):
    return next((p.dtype for p in list(module.parameters()) + list(module.buffers()) if p.is_floating_point()),
                None)


def _affine_stage(module, ctx, extra_roundings=0, abs_bias=None):
    w, b, shape = dense(module, ctx.shape)
    dtype = _param_dtype(module) or ctx.dtype
    stages = _cast(ctx, dtype)
    fmt = format_of(dtype)
    error = None if ctx.exact else float_error(fmt, w, b, extra_roundings,
                                               None if abs_bias is None else abs_bias(w, b))
    ctx.shape, ctx.dtype, ctx.scale = shape, dtype, None
    return stages + [Stage(ctx.name, w, b, shape, output_error=error)]


def _cast(ctx, dtype):
    """An identity stage rounding the running value to `dtype` when that is narrower."""
    current, target = FORMATS.get(ctx.dtype), FORMATS.get(dtype)
    if current is None or target is None or target.bits >= current.bits or ctx.exact:
        return []
    return [Stage(ctx.name + " (input cast)", None, None, ctx.shape, input_error=cast_error(target))]


register_stage(nn.Conv1d, nn.Conv2d, nn.Conv3d)(lambda m, ctx: _affine_stage(m, ctx))


WEIGHT_TYPES: Dict[Tuple[str, str], Callable] = {}  # an nn.Linear whose weight is a tensor subclass: its stage, by (module, class) name


@register_stage(nn.Linear)
def _linear(module, ctx):
    kind = type(module.weight)
    if kind in (torch.Tensor, nn.Parameter):
        return _affine_stage(module, ctx)
    builder = WEIGHT_TYPES.get((kind.__module__.split(".")[0], kind.__name__))
    if builder is not None:
        return builder(module, ctx)
    raise Declined(f"{ctx.name} (nn.Linear) holds a {kind.__module__}.{kind.__name__} weight, which "
                   "diffprobe does not model")
@register_stage(nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _avgpool(module, ctx):
    if ctx.scale is None:
        return _affine_stage(module, ctx, extra_roundings=1)
    # on a quantised tensor: the average is rounded back to the input's own grid (inside its range)
    w, b, shape = dense(module, ctx.shape)
    step = ctx.scale
    ctx.shape = shape
    error = None if ctx.exact else (lambda x_lo, x_hi, y_lo, y_hi: torch.full_like(y_lo, step / 2 * (1 + 2.0 ** -16))
                                    + FORMATS[torch.float32].rounding_error(torch.maximum(y_lo.abs(), y_hi.abs())))
    return [Stage(ctx.name, w, b, shape, output_error=error)]


@register_stage(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(module, ctx):
    if module.training or module.running_mean is None:
        raise Declined(f"{ctx.name} ({type(module).__name__}) is in training mode or has no running "
                       "statistics: not an affine map per sample")
    mean = module.running_mean.detach().double()

    def abs_bias(w, b):  # (x - mean) * scale + shift: the subtracted mean is summed too
        scale = w.abs().sum(1)
        channel = scale.reshape(len(mean), -1) * mean.abs().reshape(-1, 1) if len(scale) % len(mean) == 0 else 0
        shift = (module.bias.detach().double().abs() if module.bias is not None
                 else torch.zeros_like(mean)).repeat_interleave(len(scale) // len(mean))
        return (torch.as_tensor(channel).reshape(-1) if torch.is_tensor(channel) else 0) + shift
    return _affine_stage(module, ctx, extra_roundings=4, abs_bias=abs_bias)


@register_stage(Elementwise)
def _elementwise(module, ctx):
    return _affine_stage(module, ctx, extra_roundings=1)


@register_stage(nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.ZeroPad2d, Reshape)
def _rearrange(module, ctx):
    if isinstance(module, nn.Dropout) and module.training:
        raise Declined(f"{ctx.name} (Dropout) is in training mode: random, not a function")
    w, b, shape = dense(module, ctx.shape)
    ctx.shape = shape
    return [Stage(ctx.name, w, b, shape)]  # moves values, computes nothing: no error


def _activation(activation, ctx):
    """An activation step and, in a float format narrower than float64, the error of computing it
    there (ReLU is exact in every format and on every quantisation grid)."""
    steps = [Nonlinearity.of(activation)]
    if activation.rounds and not ctx.exact:
        fmt = FORMATS.get(ctx.dtype)
        if fmt is None or ctx.scale is not None:
            raise Declined(f"{ctx.name} ({activation.name}) runs on quantised values, which diffprobe does not model")
        if fmt.bits < 53:
            error = lambda lo, hi: function_error(fmt, torch.maximum(lo.abs(), hi.abs()))
            steps.append(Stage(ctx.name + " (rounding)", None, None, ctx.shape, input_error=error))
    return steps


def _activation_stage(module, ctx):
    activation = of_module(module)
    if activation is None:
        raise Declined(f"{ctx.name} ({type(module).__name__}) has parameters diffprobe does not relax")
    return _activation(activation, ctx)


for _type in (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.LeakyReLU, nn.ELU):
    register_stage(_type)(_activation_stage)


# --- finding the chain -----------------------------------------------------------------------------

def modules_in_order(model):
    """[(name, module or callable), ...] in the order `model` applies them, when it is a chain."""
    if isinstance(model, nn.Sequential):
        return _sequential(model, "")
    return _fx_chain(model)


def _sequential(model, prefix):
    out = []
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        out += _sequential(m, full + ".") if type(m) in (nn.Sequential, Network) else [(full, m)]
    return out


class _LeafTracer(torch.fx.Tracer):
    """Keeps every module diffprobe knows how to lower (and torch's own) as one call."""

    def is_leaf_module(self, m, qualname):
        return type(m) in STAGES or super().is_leaf_module(m, qualname)


_RESHAPES = {"view", "reshape", "flatten", "contiguous"}


def _fx_chain(model):
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many kinds for dynamic control flow
        raise Declined(f"{type(model).__name__} is neither an nn.Sequential nor traceable by torch.fx "
                       f"({type(exc).__name__}: {str(exc)[:120]})") from None
    modules = dict(model.named_modules())
    steps, current = [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise Declined(f"{type(model).__name__} takes more than one input")
            current = node
        elif node.op == "output":
            if node.args[0] is not current:
                raise NotAChain(f"{type(model).__name__}'s output is not the end of a chain")
        elif _is_shape_query(node):
            continue
        elif node.op == "get_attr":
            continue
        else:
            inputs = [a for a in node.all_input_nodes if not _is_shape_query(a) and a.op != "get_attr"]
            if inputs != [current]:
                raise NotAChain(f"{type(model).__name__} is not a chain at '{node.name}' (a branch or a "
                               "join: residual, concatenation or attention)")
            steps.append(_step(node, modules))
            current = node
    return steps


def _is_shape_query(node):
    return ((node.op == "call_method" and node.target in ("size", "dim")) or
            (node.op == "call_function" and node.target in (getattr, operator.getitem, len)
             and all(_is_shape_query(a) or a.op == "placeholder" for a in node.all_input_nodes)
             and (node.target is not operator.getitem or _is_shape_query(node.args[0]))))


def _step(node, modules):
    if node.op == "call_module":
        return node.target, modules[node.target]
    activation = of_function(node.target, node.args, node.kwargs) if node.op in ("call_function", "call_method") else None
    if activation is not None:
        return node.name, activation
    if (node.op == "call_method" and node.target in _RESHAPES) or (
            node.op == "call_function" and node.target in (torch.flatten, torch.reshape)):
        return node.name, "reshape"
    raise Declined(f"'{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}) is not an "
                   "operation diffprobe lowers")


# --- the chain ---------------------------------------------------------------------------------------

@dataclass
class Chain:
    """A model as stages and ReLUs in float64, with the error bounds of the arithmetic it runs in."""

    steps: list
    input_shape: tuple
    batch_independent: bool = True  # False: the deployed module's output for one row depends on the others
    notes: list = field(default_factory=list)

    @property
    def noisy(self):
        return any(isinstance(s, Stage) and s.noisy for s in self.steps)

    def layers(self):
        """The steps grouped between nonlinearities, as `Layer`s (each but the last followed by its
        `activation`); two nonlinearities in a row get an identity layer between them."""
        groups, current, shape = [], [], tuple(self.input_shape)
        for s in self.steps:
            if isinstance(s, Nonlinearity):
                groups.append((current or [Stage("identity", None, None, shape)], s))
                current = []
            else:
                current.append(s)
                shape = s.shape
        groups.append((current or [Stage("identity", None, None, shape)], None))
        try:
            return [Layer(g, activation) for g, activation in groups]
        except Declined:
            return None

    def forward_bounds(self, lo, hi):
        """Interval bounds [B, outputs] of the deployed outputs over boxes (interval arithmetic with
        the error terms): loose on wide boxes, tight on points; what `check` compares against."""
        lo, hi = lo.reshape(len(lo), -1).double(), hi.reshape(len(hi), -1).double()
        for s in self.steps:
            if isinstance(s, Nonlinearity):
                lo, hi = s.interval(lo, hi)
                continue
            if s.input_error is not None:
                r = s.input_error(lo, hi)
                lo, hi = lo - r, hi + r
            y_lo, y_hi = s.interval(lo, hi)
            if s.output_error is not None:
                r = s.output_error(lo, hi, y_lo, y_hi)
                y_lo, y_hi = y_lo - r, y_hi + r
            lo, hi = y_lo, y_hi
        return lo, hi

    def module(self):
        """The exact (error-free) function as a float64 nn.Module: the gradient surrogate of a
        deployed model that autograd cannot go through (int8), and the MILP oracle's network."""
        return _ExactChain(self)

    def check(self, model, points):
        """Raise Declined unless the deployed module's outputs on `points` ([n, *shape], float64),
        run one at a time, lie within the chain's bounds at those points."""
        lo, hi = self.forward_bounds(points, points)
        with torch.no_grad():
            out = torch.cat([run_native(model, p.unsqueeze(0)) for p in points]).reshape(len(points), -1)
        if out.shape != lo.shape:
            raise Declined(f"the lowered chain has {lo.shape[1]} outputs, the model {out.shape[1]}")
        slack = 1e-9 * (1 + torch.maximum(lo.abs(), hi.abs()))
        bad = (out < lo - slack) | (out > hi + slack) | torch.isnan(out)
        if bool(bad.any()):
            deviation = (out - (lo + hi) / 2).abs().max().item()
            raise Declined(f"its lowered form does not reproduce its outputs (off by {deviation:.3g} on a "
                           "sample): a module computes something its type does not say")


class _ExactChain(nn.Module):
    """A chain's exact function; weights as parameters and F.linear, which auto_LiRPA 0.3 traces
    in float64 (a matmul with a plain tensor constant comes out float32)."""

    def __init__(self, chain):
        super().__init__()
        self.input_shape = tuple(chain.input_shape)
        stages = [s for s in chain.steps if isinstance(s, Stage)]
        self.steps = [s if isinstance(s, Nonlinearity) else (s.weight is not None, s.bias is not None)
                      for s in chain.steps]
        self.weights = nn.ParameterList([nn.Parameter(s.weight, requires_grad=False) for s in stages
                                         if s.weight is not None])
        self.biases = nn.ParameterList([nn.Parameter(s.bias, requires_grad=False) for s in stages
                                        if s.bias is not None])

    def forward(self, x):
        h, w, b = x.reshape(x.shape[0], -1), iter(self.weights), iter(self.biases)
        for s in self.steps:
            if isinstance(s, Nonlinearity):
                h = s(h)
            elif s[0]:
                h = nn.functional.linear(h, next(w), next(b) if s[1] else None)
            elif s[1]:
                h = h + next(b)
        return h


def lower(model, input_shape, exact=False):
    """The `Chain` of `model` (in its own dtypes and quantisation; `exact=True`: no error terms),
    or raise `Declined` naming the module that stops it. Hooks, parametrisations and subclasses
    of known modules are declined: their forward is not what their type says."""
    _check_no_global_hooks()
    dtype = torch.float64
    ctx = Context(tuple(input_shape), dtype, exact=exact)
    try:
        steps, order = [], modules_in_order(model)
    except NotAChain:
        from .dag import lower_graph
        return _reproducing(lower_graph(model, input_shape, exact), model)
    shapes = _node_shapes(model, input_shape) if any(isinstance(m, str) for _, m in order) else {}
    for name, module in order:
        ctx.name = name
        if module == "reshape":
            steps.append(_reshape_step(shapes[name], name, ctx))
            continue
        if isinstance(module, Activation):
            steps += _activation(module, ctx)
            continue
        _check_plain(name, module)
        builder = STAGES.get(type(module))
        if builder is None:
            raise Declined(f"{name} ({type(module).__module__}.{type(module).__name__}) is not a module "
                           "diffprobe lowers")
        steps += builder(module, ctx)
    return Chain(steps, tuple(input_shape), ctx.batch_independent, ctx.notes)


def _reproducing(chain, model):
    """`chain` if its exact function matches `model` run in float64 on random inputs (a graph
    lowered node by node could misread an operation on the batch dimension), else Declined."""
    if is_quantized(model):
        return chain  # no float64 copy to compare with; `Chain.check` compares the deployed outputs
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *chain.input_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x).reshape(3, -1)
        got = chain.module()(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-7, atol=1e-9):
        raise Declined(f"{type(model).__name__}'s graph, lowered node by node, does not reproduce its outputs")
    return chain


def _reshape_step(shape, name, ctx):
    """A view/reshape/flatten in a traced forward: the same values in a new per-sample shape (the
    shape seen on a probe batch; `Chain.check` confirms the batch dimension was kept)."""
    n = math.prod(ctx.shape)
    if math.prod(shape) != n:
        raise Declined(f"'{name}' changes the number of values per sample")
    ctx.shape = shape
    return Stage(name, None, None, shape)


def _node_shapes(model, input_shape):
    """Per-sample output shapes of the fx graph's nodes, from a probe of batch 2."""
    from torch.fx.passes.shape_prop import ShapeProp
    graph = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    try:
        ShapeProp(graph).propagate(torch.zeros(2, *input_shape, dtype=input_dtype(model)))
    except Exception as exc:
        raise Declined(f"{type(model).__name__} fails on a probe input ({type(exc).__name__}: {str(exc)[:120]})") from None
    return {n.name: tuple(n.meta["tensor_meta"].shape[1:]) for n in graph.graph.nodes if "tensor_meta" in n.meta}


def _check_plain(name, module):
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks") if getattr(module, h, None)]
    if hooks and type(module) not in OBSERVED:
        raise Declined(f"{name} ({type(module).__name__}) has forward hooks that may change what it "
                       "computes (torch.nn.utils.prune's mask is one)")
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise Declined(f"{name} ({type(module).__name__}) has parametrised weights; apply them "
                       "(torch.nn.utils.parametrize.remove_parametrizations or prune.remove)")


def _check_no_global_hooks():
    from torch.nn.modules import module as m
    if m._global_forward_hooks or m._global_forward_pre_hooks:
        raise Declined("global module forward hooks are registered; they may change what any module computes")


def relu_only(layers):
    """Whether every hidden layer ends in ReLU alone: the chains the MILP oracle, the composed graph
    in deployed arithmetic and alpha-CROWN's per-ReLU bounds take."""
    return all(layer.activation.is_relu for layer in layers[:-1])


class Layer:
    """The stages between two nonlinearities composed: z = W h + b + sum_t M_t e_t with
    |e_t| <= r_t, followed by `activation` (a `Nonlinearity`; None for the output layer).
    `noise(lo, hi)` gives the terms (M_t, r_t [B, m_t]) for computed inputs h within the boxes
    [lo, hi] (M None: the identity on z); an exact layer has none."""

    def __init__(self, stages, activation=None):
        self.stages, self.activation = stages, activation
        self.weight, self.bias = None, None
        for s in stages:
            if s.weight is not None:
                if self.weight is not None and s.weight.shape[0] * self.weight.shape[1] > MAX_DENSE:
                    raise Declined(f"composing {s.name} with the layers before it needs too large a matrix")
                self.weight = s.weight if self.weight is None else s.weight @ self.weight
                self.bias = None if self.bias is None else s.weight @ self.bias
            if s.bias is not None:
                self.bias = s.bias if self.bias is None else self.bias + s.bias
        n_out = math.prod(stages[-1].shape)
        if self.weight is None:
            self.weight = torch.eye(n_out, dtype=torch.float64)
        if self.bias is None:
            self.bias = torch.zeros(n_out, dtype=torch.float64)
        self.columns = None  # set by `spread_columns`: where the real inputs sit in a padded input
        self.rows = None  # set by `spread_rows`: (index, size) of the real outputs in a padded output
        self._maps = {}

    @property
    def noisy(self):
        return any(s.noisy for s in self.stages)

    def _map(self, j, before):
        """The matrix taking an error on stage j's input (`before`) or output to the layer's output
        (None: the identity), rows spread like the layer's."""
        key = (j, before)
        if key not in self._maps:
            m = None
            for s in self.stages[j + (0 if before else 1):]:
                if s.weight is not None:
                    m = s.weight if m is None else s.weight @ m
            if self.rows is not None:
                index, size = self.rows
                m = spread(torch.eye(len(index), dtype=torch.float64) if m is None else m, index, size)
            self._maps[key] = m
        return self._maps[key]

    def noise(self, lo, hi, out=None):
        """`out`: bounds already known for the last stage's result (the layer's output less that
        stage's own error), intersected with its interval: tighter output bounds, smaller errors."""
        if self.columns is not None:
            lo, hi = lo[:, self.columns], hi[:, self.columns]
        if out is not None and self.rows is not None:  # the real outputs among the padded ones
            out = (out[0][:, self.rows[0]], out[1][:, self.rows[0]])
        terms = []
        for j, s in enumerate(self.stages):
            if s.input_error is not None:
                r = s.input_error(lo, hi)
                terms.append((self._map(j, True), r))
                lo, hi = lo - r, hi + r
            y_lo, y_hi = s.interval(lo, hi)
            if out is not None and j == len(self.stages) - 1:
                y_lo, y_hi = torch.maximum(y_lo, out[0]), torch.minimum(y_hi, out[1])
            if s.output_error is not None:
                r = s.output_error(lo, hi, y_lo, y_hi)
                terms.append((self._map(j, False), r))
                y_lo, y_hi = y_lo - r, y_hi + r
            lo, hi = y_lo, y_hi
        return terms

    def spread_rows(self, index, size):
        """This layer with its outputs placed at `index` among `size` (zero neurons elsewhere)."""
        self.weight, self.bias = spread(self.weight, index, size), spread(self.bias, index, size)
        self.rows, self._maps = (index, size), {}

    def spread_columns(self, index, size):
        """This layer reading its inputs from positions `index` of a padded input of `size`."""
        self.weight = spread(self.weight, index, size, dim=1)
        self.columns = index


def spread(t, index, size, dim=0):
    """`t` placed at positions `index` along `dim` of a zero tensor of that dimension's `size`."""
    shape = list(t.shape)
    shape[dim] = size
    full = torch.zeros(shape, dtype=t.dtype)
    full.index_copy_(dim, index, t)
    return full
