"""Difference operators: how two models' outputs on the same input are compared.

Each operator maps the outputs (a, b) of a batch to per-output values [batch, k] and reduces
them to one number per sample, the quantity the search maximises and the certificate bounds.
Registry: plain dict `DIFFERENCES` plus `register_difference`; CLI choices derive from it. The
`Objective` algebra (differences and input priors combined with +, - and scalar *) lives here too, so
both directions of the conversion are in one module; the priors are in `diffprobe.objectives`.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch

from .errors import ArgumentError, DiffprobeError


@dataclass(frozen=True)
class Difference:
    name: str
    description: str
    per_output: Callable  # (a, b) -> [batch, k]
    reduce: Callable  # [batch, k] -> [batch]
    bounded_as: Optional[str]  # the graph the certifier bounds it on: "elementwise", "probability", "top1"; None: not at all
    per_output_max: bool = False  # the summary is max |per-output value|: the search may ascend one output at a time
    default_threshold: Optional[float] = None  # label agreement: verified at <= 0 unless told otherwise
    confidence: Optional[float] = None  # delta-top-1: only where model_a's top probability is at least this

    def __call__(self, a, b):
        """The scalar disagreement per sample."""
        return self.reduce(self.per_output(a, b))

    def __repr__(self):
        return f"Difference({self.name!r}: {self.description})"

    # differences combine with priors and each other into search objectives (diffprobe.objectives)
    def __add__(self, other):
        return as_objective(self) + other

    __radd__ = __add__

    def __sub__(self, other):
        return as_objective(self) - other

    def __mul__(self, scale):
        return as_objective(self) * scale

    __rmul__ = __mul__


DIFFERENCES: Dict[str, Difference] = {}


def register_difference(difference: "Difference") -> "Difference":
    DIFFERENCES[difference.name] = difference
    return difference


def get_difference(name_or_difference: Union[str, "Difference"]) -> "Difference":
    if isinstance(name_or_difference, Difference):
        return name_or_difference
    if name_or_difference.startswith("top1@"):  # delta-top-1, as its name reads back from JSON
        try:
            return top1_where_confident(float(name_or_difference[5:]))
        except ValueError:
            pass
    try:
        return DIFFERENCES[name_or_difference]
    except KeyError:
        raise DiffprobeError(f"unknown difference '{name_or_difference}'; choose one of "
                             f"{', '.join(DIFFERENCES)}") from None


def _flat(t):
    return t.reshape(t.shape[0], -1)


def _abs_max(v):
    return v.abs().amax(dim=1)


def _log_probs(a, b):
    return torch.log_softmax(_flat(a), dim=1), torch.log_softmax(_flat(b), dim=1)


def _kl_terms(a, b):
    la, lb = _log_probs(a, b)
    return la.exp() * (la - lb)


def _js_terms(a, b):
    la, lb = _log_probs(a, b)
    lm = torch.logsumexp(torch.stack([la, lb]), dim=0) - torch.log(torch.tensor(2.0, dtype=la.dtype))
    return 0.5 * (la.exp() * (la - lm) + lb.exp() * (lb - lm))


def _flip_margins(a, b):
    """b_j - b_y for every j, where y is model_a's top label; the entry of y itself is -inf."""
    a, b = _flat(a), _flat(b)
    y = a.argmax(dim=1, keepdim=True)
    margins = b - b.gather(1, y)
    return margins.scatter(1, y, float("-inf"))


register_difference(Difference(
    "elementwise", "model_b(x) - model_a(x) per output; summary max |.| (VNN-COMP |Y_b - Y_a|)",
    lambda a, b: _flat(b) - _flat(a), _abs_max, "elementwise", per_output_max=True))
register_difference(Difference(
    "probability", "softmax(model_b(x)) - softmax(model_a(x)); summary max |.|",
    lambda a, b: torch.softmax(_flat(b), 1) - torch.softmax(_flat(a), 1), _abs_max, "probability",
    per_output_max=True))
register_difference(Difference(
    "kl", "KL(softmax(model_a(x)) || softmax(model_b(x)))",
    _kl_terms, lambda v: v.sum(dim=1), None))
register_difference(Difference(
    "js", "Jensen-Shannon divergence of the two softmax outputs",
    _js_terms, lambda v: v.sum(dim=1), None))
def _dlr_margins(a, b):
    """model_b's flip margins against model_a's label, divided by model_b's own logit spread
    (top logit minus third), so a copy with another logit scale (quantised, distilled) is
    compared on equal terms (DLR, Croce & Hein 2020)."""
    margins = _flip_margins(a, b)
    own = torch.isinf(margins)  # model_a's label: -inf, kept out of the division so no NaN gradient
    top = torch.sort(_flat(b), dim=1, descending=True).values
    spread = (top[:, 0] - top[:, min(2, top.shape[1] - 1)]).clamp_min(1e-12)
    return (margins.masked_fill(own, 0.0) / spread.unsqueeze(1)).masked_fill(own, float("-inf"))


register_difference(Difference(
    "dlr", "scale-invariant flip margin: top1's margin divided by model_b's top-minus-third logit spread",
    _dlr_margins, lambda v: v.amax(dim=1), None))
register_difference(Difference(
    "top1", "top-1 flip margin: max_j model_b_j - model_b_y with y = argmax model_a; > 0 means the labels differ",
    _flip_margins, lambda v: v.amax(dim=1), "top1", default_threshold=0.0))


def is_probability(a: torch.Tensor) -> torch.Tensor:
    """Per row: whether the outputs are a probability vector (a model ending in Softmax)."""
    return (a >= 0).all(dim=1) & ((a.sum(dim=1) - 1).abs() <= 1e-4)


def _logits(a):
    """Logits of each row: probability rows (a Softmax head) as their logarithms."""
    return torch.where(is_probability(a)[:, None], a.clamp_min(1e-300).log(), a)


def top1_where_confident(delta: float) -> Difference:
    """delta-top-1 equivalence (VeryDiff's): model_b keeps model_a's label wherever model_a's top
    softmax probability is at least `delta`. The value min(log-odds, flip margin) — the log-odds
    log((1-delta)/delta) - log sum_j exp(a_j - a_y) of model_a's top class y (>= 0 exactly when
    its probability is >= delta) and model_b's flip margin against y — is > 0 only at a
    confident label of model_a that model_b does not keep; named `top1@delta`."""
    if not 0 < delta < 1:
        raise ArgumentError(f"the confidence delta must lie strictly between 0 and 1 (got {delta})")
    log_odds = math.log((1 - delta) / delta)

    def per_output(a, b):
        a = _logits(_flat(a))
        own = torch.nn.functional.one_hot(a.argmax(dim=1), a.shape[1]).bool()
        others = (a - a.amax(dim=1, keepdim=True)).masked_fill(own, float("-inf"))
        return torch.stack([log_odds - torch.logsumexp(others, dim=1), _flip_margins(a, b).amax(dim=1)], dim=1)
    return Difference(f"top1@{delta:g}", f"top-1 flip margin where model_a's top probability is >= {delta:g}",
                      per_output, lambda v: v.amin(dim=1), "confident-top1", default_threshold=0.0,
                      confidence=delta)


# --- search objectives: differences and priors combined with +, - and scalar * -----------------

class Objective:
    def __init__(self, name, fn, base=None):
        self.name, self.fn = name, fn
        self.base = base  # the difference this objective is built on, reported as `found`

    def __call__(self, a, b, x):
        return self.fn(a, b, x)

    def __add__(self, other):
        other = as_objective(other)
        return Objective(f"{self.name} + {other.name}", lambda a, b, x: self(a, b, x) + other(a, b, x),
                         self.base or other.base)

    __radd__ = __add__

    def __sub__(self, other):
        other = as_objective(other)
        return Objective(f"{self.name} - {other.name}", lambda a, b, x: self(a, b, x) - other(a, b, x),
                         self.base or other.base)

    def __rsub__(self, other):
        return as_objective(other) - self

    def __mul__(self, scale):
        if not isinstance(scale, (int, float)):
            return NotImplemented
        name = self.name if " " not in self.name else f"({self.name})"
        return Objective(f"{scale:g} * {name}" if scale != -1 else f"-{name}",
                         lambda a, b, x: scale * self(a, b, x), self.base)

    __rmul__ = __mul__

    def __neg__(self):
        return (-1.0) * self

    def __repr__(self):
        return f"Objective({self.name})"


def as_objective(obj: Union[str, Difference, "Objective"]) -> "Objective":
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, (str, Difference)):
        diff = get_difference(obj)
        return Objective(diff.name, lambda a, b, x: diff(a, b), diff)
    raise TypeError(f"cannot combine a {type(obj).__name__} with an objective")
