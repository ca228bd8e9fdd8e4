"""Search objectives: differences, targeted flips and input priors, combined with `+`, `-` and
scalar `*`; every combination names itself.

An objective maps (output_a, output_b, x) of a batch to one value per sample, to be maximised.
Any registered difference converts to one (`as_objective`), so
    dp.get_difference("dlr") - 0.05 * tv() - 0.01 * l2()
asks for a label flip on an input that stays smooth and small.
"""
import torch

from .differences import Difference, _flat, get_difference


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


def as_objective(obj):
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, (str, Difference)):
        diff = get_difference(obj)
        return Objective(diff.name, lambda a, b, x: diff(a, b), diff)
    raise TypeError(f"cannot combine a {type(obj).__name__} with an objective")


def _tv(x):
    """Mean absolute difference between neighbouring values along the last two axes (images) or
    the last axis (vectors)."""
    flat_dims = x.dim() - 1
    terms = [(x.diff(dim=-1)).abs().reshape(len(x), -1).mean(1)]
    if flat_dims >= 2:
        terms.append((x.diff(dim=-2)).abs().reshape(len(x), -1).mean(1))
    return sum(terms)


def tv():
    """Total variation of the input (a smoothness prior: subtract it)."""
    return Objective("tv", lambda a, b, x: _tv(x))


def l2(center=None):
    """Mean squared size of the input, or of its distance to `center` (subtract it)."""
    def fn(a, b, x):
        d = x if center is None else x - center.to(x)
        return (d.reshape(len(x), -1) ** 2).mean(1)
    return Objective("l2" if center is None else "l2(x - center)", fn)


def _smooth_min(u, v, temperature=1.0):
    return -temperature * torch.logsumexp(torch.stack([-u / temperature, -v / temperature]), 0)


def flip(label_a, label_b, temperature=1.0):
    """Controversial stimuli: model_a says `label_a` while model_b says `label_b`; the smooth
    minimum of the two models' log-probabilities of those labels."""
    def fn(a, b, x):
        la, lb = torch.log_softmax(_flat(a), 1), torch.log_softmax(_flat(b), 1)
        return _smooth_min(la[:, label_a], lb[:, label_b], temperature)
    return Objective(f"flip({label_a}->{label_b})", fn)
