"""Bound methods over the composed difference graph: a registry of plain functions.

Each method takes a `Problem` and a batch of input boxes (or the region itself for L2 balls)
and returns sound lower/upper bounds on every spec row, for the models as they run (see
`diffprobe.deployment`). In exact arithmetic the composed graph is the two models' float64
forward passes; in deployed arithmetic it is their lowered chains with the error terms as a second
input (a box whose radii come from each chain's own bound pass). auto_LiRPA's option dicts are
spelled here and nowhere else.
"""
import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .execution import is_quantized
from .differential import ChainBounds, DifferentialBounds, matching_layers
from .errors import UnsupportedOperationError
from .graph import DifferenceGraph
from .lirpa_compat import import_auto_lirpa, traced
from .lowering import relu_only

BOUND_OPTS = {
    "sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False,
    "sparse_features_alpha": False, "sparse_spec_alpha": False,
    "conv_mode": "matrix",  # 0.3's patches mode crashes alpha-CROWN on MaxPool
    "optimize_bound_args": {"iteration": 20, "lr_alpha": 0.5, "enable_beta_crown": False},
}

METHODS: Dict[str, Callable] = {}


def register_method(name):
    def wrap(fn):
        METHODS[name] = fn
        return fn
    return wrap


@dataclass
class Problem:
    """What is bounded: the float64 difference graph (None when the deployed arithmetic cannot be
    bounded), its auto_LiRPA module (traced on first use), the spec matrix, the deployment."""

    graph: object
    spec: torch.Tensor  # [rows, outputs] or [boxes, rows, outputs]; None: the outputs themselves
    deployment: object
    kind: str = "elementwise"  # what is bounded: 'elementwise', 'probability' or 'stacked' (see DifferenceGraph)
    noisy: object = None  # the NoisyPair under the graph in deployed arithmetic
    margin: object = None  # a RoundingMargin widening the exact graph's bounds (deployed, not lowered)
    logits: object = None  # for probabilities: the elementwise problem of the same models
    both: object = None  # for probabilities: both models' outputs (the stacked problem)
    why_unbounded: str = ""  # why `graph` is None
    dtype: torch.dtype = torch.float64
    traced: object = None
    differential: object = None  # the differential engine (False: not applicable), built on first use
    singles: object = None  # each model traced alone, for alpha-differential; built on first use
    alpha_seconds: Optional[float] = None  # what one alpha-differential pass took on this problem
    # per hidden layer, pre-activation bounds (l, u, l', u') known to hold on the boxes about to be
    # bounded (their parents' in branch-and-bound); set only around one call of the engine
    parent_layers: Optional[list] = None
    outputs: int = 0  # outputs per model
    scale: float = 1.0  # magnitude of the models' outputs (bounds are rounded outward relative to it)

    @property
    def module(self):
        if self.graph is None:
            raise UnsupportedOperationError([self.why_unbounded], what="bounding the deployed arithmetic",
                                            hint="use arithmetic 'exact' for a bound on the stored "
                                                 "weights in exact arithmetic")
        if self.traced is None:
            inputs = (torch.zeros(1, *self.deployment.pair.input_shape, dtype=self.dtype),)
            if self.noisy is not None:
                inputs += (torch.zeros(1, self.noisy.width, dtype=self.dtype),)
            self.traced = _bounded_module(self.graph, inputs)
        return self.traced


class NoisyChain(nn.Module):
    """A lowered chain over (x, e): z_k = W_k h + b_k + sum_t M_t e_t, e holding every error term
    of the chain in order. Weights are parameters: auto_LiRPA 0.3 bounds F.linear by them."""

    def __init__(self, layers, input_size):
        super().__init__()
        self.layers = layers
        probe = torch.zeros(1, input_size, dtype=torch.float64)
        noise = ChainBounds(layers).intermediate(probe, probe).noise
        self.terms = [[r.shape[1] for _, r in terms] for terms in noise]
        self.weights = nn.ParameterList([nn.Parameter(layer.weight, requires_grad=False) for layer in layers])
        self.biases = nn.ParameterList([nn.Parameter(layer.bias, requires_grad=False) for layer in layers])
        maps = [[m for m, _ in terms] for terms in noise]
        self.maps = nn.ParameterList([nn.Parameter(m, requires_grad=False) for row in maps for m in row if m is not None])
        self.identity = [[m is None for m in row] for row in maps]
        self.width = sum(sum(row) for row in self.terms)

    def forward(self, x, e):
        h, offset, m = x.reshape(x.shape[0], -1), 0, 0
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = nn.functional.linear(h, w, b)
            for size, identity in zip(self.terms[k], self.identity[k]):
                part = e[:, offset:offset + size]
                offset += size
                if identity:
                    z = z + part
                else:
                    z = z + nn.functional.linear(part, self.maps[m])
                    m += 1
            h = torch.relu(z) if k < len(self.weights) - 1 else z
        return h

    def radii(self, lo, hi):
        """The error terms' radii over boxes [B, n], in the order `forward` reads them."""
        state = ChainBounds(self.layers).intermediate(lo, hi)
        radii = [r for terms in state.noise for _, r in terms]
        return torch.cat(radii, 1) if radii else lo[:, :0]


class NoisyPair(nn.Module):
    """Both lowered chains over (x, e): what the deployed models can output, e within its radii."""

    def __init__(self, chain_a, chain_b, input_shape):
        super().__init__()
        self.input_shape = tuple(input_shape)
        n = math.prod(input_shape)
        layers = [chain_a.layers(), chain_b.layers()]
        if None in layers or not all(map(relu_only, layers)):
            raise UnsupportedOperationError(["a chain that does not alternate affine layers and ReLUs"],
                                            what="bounding the deployed arithmetic")
        self.model_a, self.model_b = NoisyChain(layers[0], n), NoisyChain(layers[1], n)
        self.width = self.model_a.width + self.model_b.width

    def outputs(self, x, e):
        split = self.model_a.width
        return self.model_a(x, e[:, :split]), self.model_b(x, e[:, split:])

    def radii(self, lo, hi):
        lo, hi = lo.reshape(len(lo), -1).double(), hi.reshape(len(hi), -1).double()
        return torch.cat([self.model_a.radii(lo, hi), self.model_b.radii(lo, hi)], 1)


class RoundingMargin:
    """How far each deployed float model's outputs can be from its exact formula over boxes
    (`roundoff.output_errors`), as a widening of each spec row of the exact difference."""

    def __init__(self, pair, kind):
        self.pair, self.kind = pair, kind

    def rows(self, lo, hi, spec):
        from .lowering import Declined
        from .roundoff import output_errors
        n = len(lo)
        try:
            errors = [output_errors(m, lo.reshape(n, *shape), hi.reshape(n, *shape))
                      for m, shape in ((self.pair.model_a, self.pair.shape_a), (self.pair.model_b, self.pair.shape_b))]
        except Declined as why:
            raise UnsupportedOperationError([str(why)], what="bounding the rounding of the deployed arithmetic",
                                            hint="use arithmetic 'exact' for a bound on the stored weights in "
                                                 "exact arithmetic") from None
        if self.kind == "stacked":
            margin = torch.cat(errors, 1)
        elif self.kind == "probability":  # softmax moves each probability by at most half the largest logit error
            margin = 0.5 * sum(e.amax(1, keepdim=True) for e in errors).expand_as(errors[0])
        else:
            margin = errors[0] + errors[1]
        if spec is None:
            return margin
        spec = spec.to(margin.dtype).abs()
        spec = spec.expand(n, *spec.shape[-2:]) if spec.dim() == 2 or len(spec) == 1 else spec
        return torch.bmm(spec, margin.unsqueeze(-1)).squeeze(-1)


def build_problem(deployment, kind, spec=None):
    """The problem of bounding `kind` ('elementwise', 'probability' or 'stacked') between the
    deployed models: over their exact float64 pair (exact arithmetic; or deployed float models that
    are not chains, widened by a `RoundingMargin`), or their lowered chains with error terms."""
    exact_graph = lambda: DifferenceGraph(deployment.surrogate, kind).double().eval()
    if deployment.exact:
        return Problem(exact_graph(), spec, deployment, kind)
    lowered = deployment.native_bounds  # lowers both models (their notes say why not)
    why = "; ".join(deployment.notes) or "a model is not lowered"
    if lowered:
        try:
            noisy = NoisyPair(*deployment.chains, deployment.pair.input_shape)
            return Problem(DifferenceGraph(noisy, kind).eval(), spec, deployment, kind, noisy=noisy)
        except UnsupportedOperationError as exc:
            why = str(exc)
    if deployment.surrogate is None or any(map(is_quantized, deployment.models)):
        # no composed graph; the differential engine still bounds the lowered chains if both are
        return Problem(None, spec, deployment, kind, why_unbounded=why)
    return Problem(exact_graph(), spec, deployment, kind, margin=RoundingMargin(deployment.pair, kind))


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


def _no_prints():
    """auto_LiRPA prints some notices (a Dropout it cannot parse, ...) on stdout, where --json goes."""
    import io
    return contextlib.redirect_stdout(io.StringIO())


def _bounded_module(graph, inputs, dtype=torch.float64):
    """Trace `graph` with auto_LiRPA; an unboundable op gives one error listing all of them."""
    lirpa = import_auto_lirpa()
    with traced(dtype), _quiet_lirpa_logger() as collector, warnings.catch_warnings(), _no_prints():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings about shape checks
        try:
            module = lirpa.BoundedModule(graph, inputs if len(inputs) > 1 else inputs[0],
                                         bound_opts=BOUND_OPTS, verbose=False)
        except Exception as exc:  # auto_LiRPA fails in many ways on graphs it cannot handle
            raise UnsupportedOperationError(
                collector.ops or [f"{type(exc).__name__}: {str(exc)[:200]}"], what="auto_LiRPA",
                hint="replace these layers, or use search alone for a lower bound") from exc
    return module


def _bounded_input(region, lo, hi, l2=True):
    """The region as auto_LiRPA's input (or, with `l2=False`, its bounding boxes)."""
    return region.perturbation(import_auto_lirpa(), lo, hi) if l2 else _box_input(lo, hi)


def _box_input(lo, hi):
    lirpa = import_auto_lirpa()
    return lirpa.BoundedTensor((lo + hi) / 2, lirpa.PerturbationLpNorm(norm=float("inf"), x_L=lo, x_U=hi))


def _inputs(problem, x, lo, hi):
    """The traced graph's inputs: x, and under deployed arithmetic the box of the error terms."""
    if problem.noisy is None:
        return (x,)
    r = problem.noisy.radii(lo, hi).to(problem.dtype)
    return x, _box_input(-r, r)


def _lirpa_bounds(problem, region, lo, hi, method):
    """Bounds over boxes; an L2 ball is bounded both as a ball and as its bounding box, and the
    intersection kept. Under IBP only the box: 0.3 propagates an L2 input's interval as its
    centre through any op but Linear/Conv (e.g. a residual add), which is unsound."""
    module = problem.module
    if not region.is_box:
        box = _lirpa_call(problem, module, _inputs(problem, _bounded_input(region, lo, hi, l2=False), lo, hi), method)
        if method == "IBP":
            return box
        ball = _lirpa_call(problem, module, _inputs(problem, _bounded_input(region, lo, hi), lo, hi), method)
        return torch.maximum(box[0], ball[0]), torch.minimum(box[1], ball[1])
    return _lirpa_call(problem, module, _inputs(problem, _bounded_input(region, lo, hi), lo, hi), method)


def _lirpa_call(problem, module, inputs, method):
    inputs = tuple(x.to(problem.dtype) for x in inputs)
    spec = None
    if problem.spec is not None:  # one spec for all boxes [rows, outputs], or one per box
        spec = problem.spec.to(problem.dtype)
        spec = spec.expand(inputs[0].shape[0], -1, -1) if spec.dim() == 2 or len(spec) == 1 else spec
    return _compute_bounds(module, inputs, spec, method, problem.dtype)


def _compute_bounds(module, inputs, spec, method, dtype):
    with traced(dtype), _quiet_lirpa_logger(), warnings.catch_warnings(), _no_prints():
        # 0.3 warns about every identity matrix it builds for a BatchNorm layer's bounds
        warnings.filterwarnings("ignore", message="Creating an identity matrix")
        try:
            lower, upper = module.compute_bounds(x=inputs, C=spec, method=method)
        except Exception as exc:  # auto_LiRPA fails in many ways on graphs it cannot handle
            raise UnsupportedOperationError([type(exc).__name__ + ": " + str(exc)[:200]],
                                            what=f"auto_LiRPA {method} on this graph",
                                            hint="try another method (ibp, crown)") from exc
    return lower.detach(), upper.detach()


def differential_engine(problem):
    """The differential engine when the problem is an elementwise difference of two matching
    lowered chains, else None; built once per problem."""
    if problem.differential is None:
        layers = matching_layers(*problem.deployment.chains) if problem.kind in DIFFERENTIAL_KINDS else None
        problem.differential = DifferentialBounds(layers) if layers is not None else False
    return problem.differential or None


DIFFERENTIAL_KINDS = ("elementwise", "stacked")  # D itself, or spec rows over both models' outputs
ON_LOWERED_CHAINS = ("differential", "alpha-differential")  # their error terms cover the deployed arithmetic


def _engine_or_raise(problem):
    if problem.kind not in DIFFERENTIAL_KINDS:
        raise UnsupportedOperationError([problem.kind], what="the differential method",
                                        hint="it bounds the elementwise difference and linear functions of both outputs")
    engine = differential_engine(problem)
    if engine is None:
        reasons = problem.deployment.notes or ["layer structures that do not match"]
        raise UnsupportedOperationError(
            reasons, what="the differential method",
            hint="it needs two chains of affine layers (Linear, Conv, BatchNorm, AvgPool) and ReLUs "
                 "of equal depth; use crown")
    return engine


@register_method("differential")
def differential(problem, region, lo, hi):
    """Differential bounds of model_b - model_a (see diffprobe.differential); box regions only,
    an L2 ball is bounded through its bounding box."""
    given = problem.parent_layers
    if given is not None and (len(given) == 0 or len(given[0][0]) != len(lo)):
        given = None
    return _engine_or_raise(problem).bounds(lo, hi, given=given, **_engine_specs(problem))


def _engine_specs(problem):
    """The engine's spec arguments: none for the difference itself; for rows C = [C_a | C_b] over
    both models' stacked outputs, C_b on the difference and C_a + C_b on model_a."""
    if problem.kind != "stacked":
        return {}
    rows = torch.eye(problem.outputs) if problem.spec is None else problem.spec
    rows = rows.to(torch.float64)
    k = rows.shape[-1] // 2
    return {"spec": rows[..., k:], "spec_z": rows[..., :k] + rows[..., k:]}


@register_method("alpha-differential")
def alpha_differential(problem, region, lo, hi):
    """Differential bounds whose intermediate bounds are first tightened by alpha-CROWN on each
    network alone (optimised ReLU slopes): on deep networks the differential relaxation is only
    as good as the two networks' own pre-activation bounds (ACAS Xu boxes: up to 25x tighter, for
    about one alpha-CROWN pass of the composed graph)."""
    engine = _engine_or_raise(problem)
    if not engine.relu_chain:
        # alpha-CROWN's ReLU bounds line up with the engine's layers only in a ReLU chain
        return engine.bounds(lo, hi, **_engine_specs(problem))
    layers = [_per_layer(_relu_input_bounds(problem, m, lo, hi), chain, lo, hi)
              for m, chain in zip(_singles(problem), (engine.a, engine.b))]
    return engine.bounds(lo, hi, given=[a + b for a, b in zip(*layers)], **_engine_specs(problem))


def _singles(problem):
    """Each network alone in exact arithmetic, traced (its float64 stand-in)."""
    if problem.singles is None:
        shape, pair = problem.deployment.pair.input_shape, problem.deployment.surrogate
        problem.singles = [_bounded_module(m, (torch.zeros(1, *shape, dtype=problem.dtype),))
                           for m in (pair.model_a, pair.model_b)]
    return problem.singles


def _relu_input_bounds(problem, module, lo, hi):
    """Per ReLU of a traced network, in the order auto_LiRPA holds them, the bounds of its input
    over the boxes after alpha-CROWN."""
    inputs = (_box_input(lo.to(problem.dtype), hi.to(problem.dtype)),)
    _compute_bounds(module, inputs, None, "CROWN-Optimized", problem.dtype)
    return [(n.inputs[0].lower.detach().reshape(len(lo), -1).double(),
             n.inputs[0].upper.detach().reshape(len(lo), -1).double())
            for n in module._modules.values() if type(n).__name__ == "BoundRelu"]


def _per_layer(bounds, chain, lo, hi):
    """`bounds` (of the exact network) as the engine's hidden layers of `chain`, checked against
    the pre-activations at the box centres and widened by the rounding of the arithmetic the
    network runs in; infinite where they do not line up (a node-pruned model's layers are padded
    in the engine, or auto_LiRPA's ReLU order differs from the chain's)."""
    layers = chain.layers
    if len(bounds) != len(layers) - 1:
        return _unbounded(layers, len(lo))
    h = ((lo + hi) / 2).reshape(len(lo), -1).double()
    for layer, (l, u) in zip(layers[:-1], bounds):
        z = h @ layer.weight.T + layer.bias
        tol = 1e-9 * (1 + z.abs())
        if l.shape != z.shape or bool(((z < l - tol) | (z > u + tol)).any()):
            return _unbounded(layers, len(lo))
        h = torch.relu(z)
    if not any(layer.noisy for layer in layers):
        return bounds
    return [(l - d, u + d) for (l, u), d in zip(bounds, chain.rounding_spread(lo, hi))]


def _unbounded(layers, boxes):
    inf = lambda layer: torch.full((boxes, layer.weight.shape[0]), float("inf"), dtype=torch.float64)
    return [(-inf(layer), inf(layer)) for layer in layers[:-1]]


@register_method("ibp")
def ibp(problem, region, lo, hi):
    return _lirpa_bounds(problem, region, lo, hi, "IBP")


@register_method("crown")
def crown(problem, region, lo, hi):
    return _lirpa_bounds(problem, region, lo, hi, "backward")


@register_method("alpha-crown")
def alpha_crown(problem, region, lo, hi):
    return _lirpa_bounds(problem, region, lo, hi, "CROWN-Optimized")
