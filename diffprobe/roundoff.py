"""Forward rounding-error analysis of a float model that is not a chain (residual, attention,
smooth activations): how far its outputs, computed in its own format, can be from the same
formula in exact arithmetic, over a box.

The model's torch.fx graph is interpreted on `Interval`s: per node an interval [lo, hi] holding
the exact value over the box (interval arithmetic in float64) and a bound `err` on
|computed - exact|. Each operation adds its own rounding (`arithmetic.dot_error`, half an ulp
of its result) to what it propagates from its inputs: a linear map moves an error by |W|, a
1-Lipschitz function (ReLU, max pooling) keeps it, a smooth one scales it by its largest slope, a
product of two computed values picks up both errors. The exact difference is bounded by the
composed-graph methods; `margin` (each model's `err` at the outputs) widens that bound to cover
the models as they run. Looser than the lowered chains' error terms (intervals, not linear
relaxations), but it covers any graph of the operations in `RULES`; anything else is declined.

Elementwise functions (exp, tanh, erf, ...) are assumed accurate to `FUNCTION_ULPS` units in the last place
in the accumulator format before their final rounding, as PyTorch's CPU and CUDA kernels are
(1-4 ulp in their tests).
"""
import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from .arithmetic import FORMATS, accumulator_of, dot_error, format_of, function_error
from .layers import Elementwise, Reshape
from .lowering import Declined


@dataclass
class Interval:
    """lo <= exact <= hi, |computed - exact| <= err; tensors with a batch dimension (the boxes)."""

    lo: torch.Tensor
    hi: torch.Tensor
    err: torch.Tensor

    @property
    def magnitude(self):
        """A bound on |computed value|."""
        return torch.maximum(self.lo.abs(), self.hi.abs()) + self.err

    @property
    def shape(self):
        return self.lo.shape

    def size(self, dim=None):
        return self.lo.size() if dim is None else self.lo.size(dim)

    def dim(self):
        return self.lo.dim()

    def map(self, fn):
        """A rearrangement (reshape, permutation, selection) applied to all three tensors."""
        return Interval(fn(self.lo), fn(self.hi), fn(self.err))


class _Context:
    def __init__(self, fmt):
        self.fmt, self.acc = fmt, accumulator_of(fmt)

    def rounded(self, magnitude, operations=1):
        """Error of a result of this magnitude computed by `operations` rounded operations in the
        accumulator format, then rounded to the model's format."""
        return dot_error(self.fmt, 0, magnitude, magnitude, operations - 1)

    def function(self, magnitude):
        """Error of an elementwise function's result of this magnitude (`arithmetic.function_error`)."""
        return function_error(self.fmt, magnitude)


def _affine(module, x, ctx, extra=0):
    """Linear/Conv (any module linear in x plus a bias): interval by centre and radius, error by
    |W| applied to the incoming error plus the accumulation's own."""
    plain = _float64(module)
    absolute = _float64(module, absolute=True)
    with torch.no_grad():
        center = plain((x.lo + x.hi) / 2)
        radius = absolute((x.hi - x.lo) / 2)
        bias = plain(torch.zeros_like(x.lo[:1]))
        abs_sum = absolute(x.magnitude) + bias.abs()
        moved = absolute(x.err)
    terms = _terms(module)
    y_mag = torch.maximum((center - radius).abs(), (center + radius).abs()) + moved
    err = moved + dot_error(ctx.fmt, terms, abs_sum, y_mag, extra)
    return Interval(center - radius, center + radius, err)


def _float64(module, absolute=False):
    import copy
    clone = copy.deepcopy(module).double()
    if absolute:
        with torch.no_grad():
            for name, p in clone.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.abs_()
    return clone


def _terms(module):
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    return 1


def _batchnorm(module, x, ctx):
    if module.training or module.running_mean is None:
        raise Declined(f"{type(module).__name__} in training mode")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = (module.weight.double() if module.weight is not None else 1.0) / torch.sqrt(module.running_var.double() + module.eps)
    scale = torch.as_tensor(scale).reshape(shape)
    mean = module.running_mean.double().reshape(shape)
    shift = (module.bias.double().reshape(shape) if module.bias is not None else 0.0) - mean * scale
    a, b = scale * x.lo + shift, scale * x.hi + shift
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    magnitude = scale.abs() * (x.magnitude + mean.abs()) + (module.bias.double().abs().reshape(shape)
                                                             if module.bias is not None else 0.0)
    err = scale.abs() * x.err + ctx.rounded(magnitude, operations=4)
    return Interval(lo, hi, err)


def _layernorm(module, x, ctx):
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing dims: the division is
    bounded through a lower bound on the standard deviation."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    n = math.prod(module.normalized_shape)
    mean_lo, mean_hi = x.lo.mean(dims, keepdim=True), x.hi.mean(dims, keepdim=True)
    # x_i - mean = (1 - 1/n) x_i - (1/n) sum_{j != i} x_j
    c_lo = (1 - 1 / n) * x.lo - (mean_hi * n - x.hi) / n
    c_hi = (1 - 1 / n) * x.hi - (mean_lo * n - x.lo) / n
    c_mag = torch.maximum(c_lo.abs(), c_hi.abs())
    var_lo, var_hi = _least_variance(x.lo, x.hi, dims), (c_mag ** 2).mean(dims, keepdim=True)
    s_lo, s_hi = torch.sqrt(var_lo + module.eps), torch.sqrt(var_hi + module.eps)
    q_lo = torch.minimum(c_lo / s_lo, c_lo / s_hi)
    q_hi = torch.maximum(c_hi / s_lo, c_hi / s_hi)
    # errors of the centred values (the mean: n + 1 operations), the variance, the standard
    # deviation (sqrt is 1 / (2 s_min)-Lipschitz above s_min) and the quotient
    e_mean = x.err.amax(dims, keepdim=True) + ctx.rounded(x.magnitude.amax(dims, keepdim=True), n + 1)
    e_c = x.err + e_mean + ctx.rounded(c_mag + e_mean + x.err, 1)
    c_max = (c_mag + e_c).amax(dims, keepdim=True)
    e_var = (2 * c_mag * e_c + e_c ** 2).mean(dims, keepdim=True) + ctx.rounded(c_max ** 2, n + 2)
    s_min = torch.sqrt((var_lo - e_var).clamp_min(0) + module.eps)
    e_s = e_var / (2 * s_min) + ctx.rounded(s_hi + e_var, 2)
    computed_min = (s_min - e_s).clamp_min(1e-300)  # the computed standard deviation is at least this
    q_mag = torch.maximum(q_lo.abs(), q_hi.abs())
    e_q = e_c / computed_min + c_mag * e_s / (s_min * computed_min)
    e_q = e_q + ctx.rounded(q_mag + e_q, 1)
    e_q = torch.where(s_min > e_s, e_q, torch.full_like(e_q, math.inf))
    weight = module.weight.double() if module.weight is not None else torch.ones(module.normalized_shape, dtype=torch.float64)
    bias = module.bias.double() if module.bias is not None else torch.zeros_like(weight)
    a, b = q_lo * weight + bias, q_hi * weight + bias
    err = weight.abs() * e_q + ctx.rounded(q_mag * weight.abs() + bias.abs(), 2)
    return Interval(torch.minimum(a, b), torch.maximum(a, b), err)


def _least_variance(lo, hi, dims, steps=80):
    """The smallest variance over the trailing `dims` of any x in the box [lo, hi]: the variance
    is min over t of mean (x_i - t)^2, so the box's least one is min over t of the mean squared
    distance of t to each [lo_i, hi_i], a convex function of one variable (ternary search)."""
    shape = lo.shape[:lo.dim() - len(dims)] + (1,) * len(dims)
    lo_f, hi_f = lo.reshape(*lo.shape[:lo.dim() - len(dims)], -1), hi.reshape(*hi.shape[:hi.dim() - len(dims)], -1)
    f = lambda t: ((lo_f - t).clamp_min(0) ** 2 + (t - hi_f).clamp_min(0) ** 2).mean(-1, keepdim=True)
    a, b = lo_f.amin(-1, keepdim=True), hi_f.amax(-1, keepdim=True)
    for _ in range(steps):
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        smaller = f(m1) < f(m2)
        a, b = torch.where(smaller, a, m1), torch.where(smaller, m2, b)
    # |f'| <= 2 * span on the bracket, and the minimiser lies in it: step back by that much
    span = hi_f.amax(-1, keepdim=True) - lo_f.amin(-1, keepdim=True)
    least = f((a + b) / 2) - 2 * span * (b - a).abs()
    return least.clamp_min(0).reshape(shape)


def _monotone(fn, slope, low=None):
    """An elementwise function that is monotone (increasing) above `low` (its minimiser; None:
    everywhere), with |derivative| <= slope."""
    def rule(x, ctx):
        lo, hi = fn(x.lo), fn(x.hi)
        if low is not None:  # non-monotone below its minimiser: the minimum is inside [lo, hi]
            inside = (x.lo < low) & (x.hi > low)
            lo = torch.where(inside, torch.full_like(lo, fn(torch.tensor(low, dtype=torch.float64)).item()),
                             torch.minimum(lo, hi))
            hi = torch.maximum(fn(x.lo), fn(x.hi))
        magnitude = torch.maximum(lo.abs(), hi.abs()) + slope * x.err
        return Interval(lo, hi, slope * x.err + ctx.function(magnitude))
    return rule


def _relu(x, ctx):
    return Interval(x.lo.clamp_min(0), x.hi.clamp_min(0), x.err)  # exact, 1-Lipschitz


def _leaky(slope):
    def rule(x, ctx):
        f = lambda t: torch.where(t >= 0, t, slope * t)
        return Interval(f(x.lo), f(x.hi), max(1.0, abs(slope)) * x.err + ctx.rounded(x.magnitude * abs(slope), 1))
    return rule


def _softmax(dim):
    def rule(x, ctx):
        # softmax_i is increasing in z_i and decreasing in the others
        e_lo, e_hi = torch.exp(x.lo - x.hi.amax(dim, keepdim=True)), torch.exp(x.hi - x.hi.amax(dim, keepdim=True))
        rest_hi = e_hi.sum(dim, keepdim=True) - e_hi
        rest_lo = e_lo.sum(dim, keepdim=True) - e_lo
        lo = e_lo / (e_lo + rest_hi)
        hi = e_hi / (e_hi + rest_lo)
        n = x.lo.shape[dim]
        # each output moves by at most half the largest input error (row sums of the Jacobian <= 1/2)
        err = 0.5 * x.err.amax(dim, keepdim=True) + ctx.function(hi) + ctx.rounded(hi, n + 2)
        return Interval(lo, hi.clamp_max(1.0), err.expand_as(lo))
    return rule


def _add(x, y, ctx, sign=1.0):
    if not isinstance(y, Interval):
        y = _constant(y, x, ctx)
    if not isinstance(x, Interval):
        x = _constant(x, y, ctx)
    lo = x.lo + (y.lo if sign > 0 else -y.hi)
    hi = x.hi + (y.hi if sign > 0 else -y.lo)
    err = x.err + y.err
    return Interval(lo, hi, err + ctx.rounded(torch.maximum(lo.abs(), hi.abs()) + err, 1))


def _constant(c, like, ctx):
    """A constant operand: a stored tensor (a parameter, a buffer) is exact; a Python number is
    rounded to the model's format when it runs."""
    err = torch.zeros(()) if isinstance(c, torch.Tensor) else ctx.fmt.rounding_error(abs(float(c)))
    c = torch.as_tensor(c, dtype=torch.float64)
    return Interval(c.expand_as(like.lo), c.expand_as(like.lo), err.double().expand_as(like.lo))


def _mul(x, y, ctx):
    if not isinstance(y, Interval):
        y = _constant(y, x, ctx)
    if not isinstance(x, Interval):
        x = _constant(x, y, ctx)
    corners = torch.stack([x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi])
    lo, hi = corners.amin(0), corners.amax(0)
    mx, my = torch.maximum(x.lo.abs(), x.hi.abs()), torch.maximum(y.lo.abs(), y.hi.abs())
    err = mx * y.err + my * x.err + x.err * y.err
    return Interval(lo, hi, err + ctx.rounded(torch.maximum(lo.abs(), hi.abs()) + err, 1))


def _div(x, y, ctx):
    if isinstance(y, Interval):
        raise Declined("division by a computed value")
    return _mul(x, 1.0 / torch.as_tensor(y, dtype=torch.float64), ctx)


def _matmul(x, y, ctx):
    """x @ y of two computed values (attention) or of a value and a constant."""
    if not isinstance(y, Interval):  # a stored matrix: exact
        y = torch.as_tensor(y, dtype=torch.float64)
        y = Interval(y, y, torch.zeros_like(y))
    xc, xr = (x.lo + x.hi) / 2, (x.hi - x.lo) / 2
    yc, yr = (y.lo + y.hi) / 2, (y.hi - y.lo) / 2
    center = xc @ yc
    radius = xc.abs() @ yr + xr @ yc.abs() + xr @ yr
    mx, my = x.magnitude, y.magnitude
    err = (mx - x.err) @ y.err + x.err @ (my - y.err) + x.err @ y.err
    n = x.lo.shape[-1]
    y_mag = torch.maximum((center - radius).abs(), (center + radius).abs()) + err
    return Interval(center - radius, center + radius, err + dot_error(ctx.fmt, n, mx @ my, y_mag))


def _pool(kind):
    def rule(module, x, ctx):
        if kind == "max":  # 1-Lipschitz and monotone: no rounding, the error moves with the maximum
            return Interval(module(x.lo), module(x.hi), module(x.err))
        plain = _float64(module)
        magnitude = plain(x.magnitude)
        terms = _window(module, x.lo.shape, magnitude.shape)
        return Interval(plain(x.lo), plain(x.hi), plain(x.err) + dot_error(ctx.fmt, terms, magnitude, magnitude, 1))
    return rule


def _window(module, in_shape, out_shape):
    """The most inputs one output of an average pooling sums."""
    size = getattr(module, "kernel_size", None)
    spatial = 1 if "1d" in type(module).__name__ else 2
    if size is not None:
        return math.prod(size) if isinstance(size, tuple) else size ** spatial
    return math.prod(math.ceil(i / o) + 1 for i, o in zip(in_shape[-spatial:], out_shape[-spatial:]))


MODULE_RULES = {
    nn.Linear: _affine, nn.Conv1d: _affine, nn.Conv2d: _affine, nn.Conv3d: _affine,
    nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm, nn.LayerNorm: _layernorm,
    nn.ReLU: lambda m, x, ctx: _relu(x, ctx),
    nn.GELU: lambda m, x, ctx: _monotone(lambda t: nn.functional.gelu(t, approximate=m.approximate), 1.13, -0.7518)(x, ctx),
    nn.SiLU: lambda m, x, ctx: _monotone(nn.functional.silu, 1.1, -1.2785)(x, ctx),
    nn.Sigmoid: lambda m, x, ctx: _monotone(torch.sigmoid, 0.25)(x, ctx),
    nn.Tanh: lambda m, x, ctx: _monotone(torch.tanh, 1.0)(x, ctx),
    nn.LeakyReLU: lambda m, x, ctx: _leaky(m.negative_slope)(x, ctx),
    nn.ELU: lambda m, x, ctx: _monotone(lambda t: nn.functional.elu(t, m.alpha), max(1.0, m.alpha))(x, ctx),
    nn.Softplus: lambda m, x, ctx: _monotone(lambda t: nn.functional.softplus(t, m.beta, m.threshold), 1.0)(x, ctx),
    nn.Softmax: lambda m, x, ctx: _softmax(m.dim)(x, ctx),
    nn.MaxPool1d: _pool("max"), nn.MaxPool2d: _pool("max"),
    nn.AvgPool1d: _pool("avg"), nn.AvgPool2d: _pool("avg"),
    nn.AdaptiveAvgPool1d: _pool("avg"), nn.AdaptiveAvgPool2d: _pool("avg"),
    nn.Flatten: lambda m, x, ctx: x.map(m), nn.Unflatten: lambda m, x, ctx: x.map(m),
    nn.Identity: lambda m, x, ctx: x, Reshape: lambda m, x, ctx: x.map(m),
    Elementwise: lambda m, x, ctx: _add(_mul(x, m.scale.double(), ctx), m.shift.double(), ctx),
}

_REARRANGE = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "unsqueeze", "squeeze",
              "expand", "chunk", "split"}
FUNCTION_RULES = {
    operator.add: _add, torch.add: _add, operator.sub: lambda x, y, ctx: _add(x, y, ctx, -1.0),
    torch.sub: lambda x, y, ctx: _add(x, y, ctx, -1.0), operator.mul: _mul, torch.mul: _mul,
    operator.truediv: _div, torch.div: _div, operator.matmul: _matmul, torch.matmul: _matmul, torch.bmm: _matmul,
    torch.relu: lambda x, ctx: _relu(x, ctx), nn.functional.relu: lambda x, ctx, inplace=False: _relu(x, ctx),
    torch.tanh: lambda x, ctx: _monotone(torch.tanh, 1.0)(x, ctx),
    torch.sigmoid: lambda x, ctx: _monotone(torch.sigmoid, 0.25)(x, ctx),
    nn.functional.gelu: lambda x, ctx, approximate="none": _monotone(
        lambda t: nn.functional.gelu(t, approximate=approximate), 1.13, -0.7518)(x, ctx),
    nn.functional.silu: lambda x, ctx, inplace=False: _monotone(nn.functional.silu, 1.1, -1.2785)(x, ctx),
    torch.softmax: lambda x, dim, ctx, dtype=None: _softmax(dim)(x, ctx),
    nn.functional.softmax: lambda x, dim=None, ctx=None, _stacklevel=3, dtype=None: _softmax(dim)(x, ctx),
    operator.neg: lambda x, ctx: Interval(-x.hi, -x.lo, x.err), torch.neg: lambda x, ctx: Interval(-x.hi, -x.lo, x.err),
}


def _holds_interval(obj):
    """Whether an argument structure holds an `Interval` anywhere (torch.cat takes a list of them)."""
    if isinstance(obj, Interval):
        return True
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return any(_holds_interval(v) for v in values)


class _Interpreter(torch.fx.Interpreter):
    """Runs the fx graph on `Interval`s (tensor-valued constants pass through as tensors)."""

    def __init__(self, graph_module, ctx):
        super().__init__(graph_module)
        self.ctx = ctx

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        rule = MODULE_RULES.get(type(module))
        if rule is None or getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None):
            raise Declined(f"{target} ({type(module).__name__}) has no rounding rule")
        if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) and \
                any(type(p) not in (torch.Tensor, nn.Parameter) for p in module.parameters()):
            raise Declined(f"{target} holds tensor subclasses")
        if torch.nn.utils.parametrize.is_parametrized(module):
            raise Declined(f"{target} has parametrised weights")
        return rule(module, args[0], self.ctx)

    def call_function(self, target, args, kwargs):
        if not _holds_interval((args, kwargs)):  # shape arithmetic, constants
            return super().call_function(target, args, kwargs)
        if target in (torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze,
                      torch.squeeze, operator.getitem):
            return args[0].map(lambda t: target(t, *args[1:], **kwargs))
        if target in (torch.cat, torch.concat):
            parts = args[0]
            return Interval(*(torch.cat([getattr(p, f) for p in parts], *args[1:], **kwargs)
                              for f in ("lo", "hi", "err")))
        rule = FUNCTION_RULES.get(target)
        if rule is None:
            raise Declined(f"{getattr(target, '__name__', target)} has no rounding rule")
        return rule(*args, ctx=self.ctx, **kwargs)

    def call_method(self, target, args, kwargs):
        x = args[0]
        if not isinstance(x, Interval):
            return super().call_method(target, args, kwargs)
        if target in ("size", "dim"):
            return getattr(x.lo, target)(*args[1:], **kwargs)
        if target in _REARRANGE:
            return x.map(lambda t: getattr(t, target)(*args[1:], **kwargs))
        if target == "relu":
            return _relu(x, self.ctx)
        if target == "softmax":
            return _softmax(args[1] if len(args) > 1 else kwargs["dim"])(x, self.ctx)
        if target in ("mean", "sum"):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = kwargs.get("keepdim", False)
            n = x.lo.numel() // max(1, getattr(x.lo, target)(dims, keepdim=True).numel()) if dims is not None else x.lo[0].numel()
            scale = 1.0 / n if target == "mean" else 1.0
            reduce = lambda t: t.sum(dims, keepdim=keep) * scale
            return Interval(reduce(x.lo), reduce(x.hi),
                            reduce(x.err) + dot_error(self.ctx.fmt, n, reduce(x.magnitude), reduce(x.magnitude), 1))
        if target in ("add", "sub", "mul", "div", "matmul"):
            fn = {"add": _add, "sub": lambda a, b, ctx: _add(a, b, ctx, -1.0), "mul": _mul, "div": _div,
                  "matmul": _matmul}[target]
            return fn(x, args[1], self.ctx)
        raise Declined(f"method {target} has no rounding rule")


def output_errors(model, lo, hi):
    """Per box ([B, *input shape] bounds) and output, a bound on |model as it runs - model in
    exact arithmetic on its stored weights|, or raise `Declined` naming what has no rule."""
    from .lowering import _LeafTracer
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.float32
    fmt = format_of(dtype)
    ctx = _Context(fmt)
    try:
        graph = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception as exc:
        raise Declined(f"{type(model).__name__} is not traceable by torch.fx ({type(exc).__name__})") from None
    lo, hi = lo.double(), hi.double()
    cast = fmt.rounding_error(torch.maximum(lo.abs(), hi.abs())) if fmt is not FORMATS[torch.float64] else torch.zeros_like(lo)
    try:
        with torch.no_grad():
            out = _Interpreter(graph, ctx).run(Interval(lo, hi, cast))
    except Declined:
        raise
    except Exception as exc:  # an operation on an Interval we do not model
        raise Declined(f"the rounding analysis failed ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(out, Interval):
        raise Declined("the model's output is not a single tensor")
    err = out.err.reshape(len(lo), -1)
    return torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
