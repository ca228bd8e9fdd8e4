"""Bound methods over the composed difference graph: a registry of plain functions.

Each method takes a `Problem` and a batch of input boxes (or the region itself for L2 balls)
and returns sound lower/upper bounds on every spec row. auto_LiRPA's option dicts are spelled
here and nowhere else.
"""
import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch

from .differential import DifferentialBounds, matching_chains
from .errors import UnsupportedOperationError
from .graph import DifferenceGraph
from .lirpa_compat import import_auto_lirpa, traced

BOUND_OPTS = {
    "sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False,
    "sparse_features_alpha": False, "sparse_spec_alpha": False,
    "conv_mode": "matrix",  # 0.3's patches mode crashes alpha-CROWN on MaxPool
    "optimize_bound_args": {"iteration": 20, "lr_alpha": 0.5, "enable_beta_crown": False},
}

METHODS = {}


def register_method(name):
    def wrap(fn):
        METHODS[name] = fn
        return fn
    return wrap


@dataclass
class Problem:
    """What is bounded: the float64 graph, its auto_LiRPA module, the spec matrix, the dtype."""

    graph: DifferenceGraph
    module: object
    spec: torch.Tensor  # [rows, outputs] or [boxes, rows, outputs]; None: the outputs themselves
    dtype: torch.dtype = torch.float64
    differential: object = None  # the differential engine (False: not applicable), built on first use
    singles: object = None  # each model traced alone, for alpha-differential; built on first use
    alpha_seconds: float = None  # what one alpha-differential pass took on this problem


class _UnsupportedCollector(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.ops = []

    def emit(self, record):
        if record.msg.startswith("The node has an unsupported operation") and record.args:
            node = record.args[0]
            op = getattr(node, "op", str(node))
            if op.startswith("aten::ATen"):  # the ONNX fallback names the real op in an attribute
                op = "aten::" + str((getattr(node, "attr", None) or {}).get("operator", "?"))
            self.ops.append(op.replace("onnx::", ""))


@contextlib.contextmanager
def _quiet_lirpa_logger():
    logger = logging.getLogger("auto_LiRPA.utils")
    collector, old = _UnsupportedCollector(), (logger.propagate, logger.handlers[:])
    logger.handlers, logger.propagate = [collector], False
    try:
        yield collector
    finally:
        logger.propagate, logger.handlers = old


def build_problem(graph, input_shape, spec=None, dtype=torch.float64):
    """Trace `graph` with auto_LiRPA; an unboundable op gives one error listing all of them."""
    graph = graph.to(dtype).eval()
    return Problem(graph, _bounded_module(graph, input_shape, dtype), spec, dtype)


def _bounded_module(graph, input_shape, dtype):
    lirpa = import_auto_lirpa()
    with traced(dtype), _quiet_lirpa_logger() as collector, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings about shape checks
        try:
            module = lirpa.BoundedModule(graph, torch.zeros(1, *input_shape, dtype=dtype),
                                         bound_opts=BOUND_OPTS, verbose=False)
        except NotImplementedError as exc:
            raise UnsupportedOperationError(
                collector.ops or [str(exc)], what="auto_LiRPA",
                hint="replace these layers, or use search alone for a lower bound") from exc
    return module


def _bounded_input(region, lo, hi, l2=True):
    if l2 and region.norm == 2.0:
        lirpa = import_auto_lirpa()
        # one ball, or (drift) balls of one radius stacked: their centres are already a batch
        center = region.center.to(lo.dtype)
        center = center if center.dim() == lo.dim() else center.unsqueeze(0)
        return lirpa.BoundedTensor(center, lirpa.PerturbationLpNorm(norm=2, eps=region.eps))
    return _box_input(lo, hi)


def _box_input(lo, hi):
    lirpa = import_auto_lirpa()
    return lirpa.BoundedTensor((lo + hi) / 2, lirpa.PerturbationLpNorm(norm=float("inf"), x_L=lo, x_U=hi))


def _lirpa_bounds(problem, region, lo, hi, method):
    """Bounds over boxes; an L2 ball is bounded both as a ball and as its bounding box, and the
    intersection kept. Under IBP only the box: 0.3 propagates an L2 input's interval as its
    centre through any op but Linear/Conv (e.g. a residual add), which is unsound."""
    if region.norm == 2.0:
        box = _lirpa_call(problem, _bounded_input(region, lo, hi, l2=False), method)
        if method == "IBP":
            return box
        ball = _lirpa_call(problem, _bounded_input(region, lo, hi), method)
        return torch.maximum(box[0], ball[0]), torch.minimum(box[1], ball[1])
    return _lirpa_call(problem, _bounded_input(region, lo, hi), method)


def _lirpa_call(problem, x, method):
    x = x.to(problem.dtype)
    spec = None
    if problem.spec is not None:  # one spec for all boxes [rows, outputs], or one per box
        spec = problem.spec.to(problem.dtype)
        spec = spec.expand(x.shape[0], -1, -1) if spec.dim() == 2 or len(spec) == 1 else spec
    return _compute_bounds(problem.module, x, spec, method, problem.dtype)


def _compute_bounds(module, x, spec, method, dtype):
    with traced(dtype), _quiet_lirpa_logger(), warnings.catch_warnings():
        # 0.3 warns about every identity matrix it builds for a BatchNorm layer's bounds
        warnings.filterwarnings("ignore", message="Creating an identity matrix")
        try:
            lower, upper = module.compute_bounds(x=(x,), C=spec, method=method)
        except (NotImplementedError, AssertionError, RuntimeError) as exc:
            raise UnsupportedOperationError([type(exc).__name__ + ": " + str(exc)[:200]],
                                            what=f"auto_LiRPA {method} on this graph",
                                            hint="try --method ibp or crown") from exc
    return lower.detach(), upper.detach()


def differential_engine(problem):
    """The differential engine when the problem is an elementwise difference of two matching
    affine/ReLU chains, else None; built once per problem."""
    if problem.differential is None:
        chains = matching_chains(problem.graph.pair) if problem.graph.kind == "elementwise" else None
        problem.differential = DifferentialBounds(chains) if chains is not None else False
    return problem.differential or None


def _engine_or_raise(problem):
    if problem.graph.kind != "elementwise":
        raise UnsupportedOperationError([problem.graph.kind], what="the differential method",
                                        hint="it bounds the elementwise difference only")
    engine = differential_engine(problem)
    if engine is None:
        raise UnsupportedOperationError(
            ["layer structures that do not match"], what="the differential method",
            hint="it needs two chains of affine layers (Linear, Conv, BatchNorm, AvgPool) and ReLUs "
                 "of equal depth; use crown")
    return engine


@register_method("differential")
def differential(problem, region, lo, hi):
    """Differential bounds of model_b - model_a (see diffprobe.differential); box regions only,
    an L2 ball is bounded through its bounding box."""
    return _engine_or_raise(problem).bounds(lo, hi)


@register_method("alpha-differential")
def alpha_differential(problem, region, lo, hi):
    """Differential bounds whose intermediate bounds are first tightened by alpha-CROWN on each
    network alone (optimised ReLU slopes): on deep networks the differential relaxation is only
    as good as the two networks' own pre-activation bounds (ACAS Xu boxes: up to 25x tighter, for
    about one alpha-CROWN pass of the composed graph)."""
    engine = _engine_or_raise(problem)
    if problem.singles is None:
        pair, shape = problem.graph.pair, problem.graph.pair.input_shape
        problem.singles = [_bounded_module(m, shape, problem.dtype) for m in (pair.model_a, pair.model_b)]
    layers = [_per_layer(_relu_input_bounds(m, lo, hi, problem.dtype), chain, lo, hi)
              for m, chain in zip(problem.singles, (engine.a, engine.b))]
    return engine.bounds(lo, hi, given=[a + b for a, b in zip(*layers)])


def _relu_input_bounds(module, lo, hi, dtype):
    """Per ReLU of a traced network, in the order auto_LiRPA holds them, the bounds of its input
    over the boxes after alpha-CROWN."""
    _compute_bounds(module, _box_input(lo.to(dtype), hi.to(dtype)), None, "CROWN-Optimized", dtype)
    return [(n.inputs[0].lower.detach().reshape(len(lo), -1).double(),
             n.inputs[0].upper.detach().reshape(len(lo), -1).double())
            for n in module._modules.values() if type(n).__name__ == "BoundRelu"]


def _per_layer(bounds, chain, lo, hi):
    """`bounds` as the engine's hidden layers of `chain`, checked against the pre-activations at
    the box centres; infinite where they do not line up (a node-pruned model's layers are padded
    in the engine, or auto_LiRPA's ReLU order differs from the chain's)."""
    if len(bounds) != len(chain) - 1:
        return _unbounded(chain, len(lo))
    h = ((lo + hi) / 2).reshape(len(lo), -1).double()
    for (w, b), (l, u) in zip(chain[:-1], bounds):
        z = h @ w.T + b
        tol = 1e-9 * (1 + z.abs())
        if l.shape != z.shape or bool(((z < l - tol) | (z > u + tol)).any()):
            return _unbounded(chain, len(lo))
        h = torch.relu(z)
    return bounds


def _unbounded(chain, boxes):
    inf = lambda w: torch.full((boxes, w.shape[0]), float("inf"), dtype=torch.float64)
    return [(-inf(w), inf(w)) for w, _ in chain[:-1]]


@register_method("ibp")
def ibp(problem, region, lo, hi):
    return _lirpa_bounds(problem, region, lo, hi, "IBP")


@register_method("crown")
def crown(problem, region, lo, hi):
    return _lirpa_bounds(problem, region, lo, hi, "backward")


@register_method("alpha-crown")
def alpha_crown(problem, region, lo, hi):
    return _lirpa_bounds(problem, region, lo, hi, "CROWN-Optimized")
