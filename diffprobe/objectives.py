"""Search objectives: differences, targeted flips and input priors, combined with `+`, `-` and
scalar `*`; every combination names itself.

An objective maps (output_a, output_b, x) of a batch to one value per sample, to be maximised.
Any registered difference converts to one (`as_objective`), so
    dp.get_difference("dlr") - 0.05 * tv() - 0.01 * l2()
asks for a label flip on an input that stays smooth and small.
"""
import torch

from .differences import Objective, _flat, as_objective  # noqa: F401  (the algebra lives with the differences)


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
