"""Elementwise activations as the bound engines see them.

An `Activation` gives, for pre-activation bounds [l, u] ([B, n] tensors):
  - `lines(l, u)`: linear bounds lo_s z + lo_c <= sigma(z) <= up_s z + up_c on [l, u] (CROWN's);
  - `interval(l, u)`: bounds of sigma over [l, u];
  - `differences(l, u, lp, up, dl, du)`: linear bounds of E = sigma(z + D) - sigma(z) in (D, z)
    over z in [l, u], z + D in [lp, up], D in [dl, du] (the differential engine's, see
    `diffprobe.differential`), and `difference_interval` bounds of E itself.

ReLU keeps its hand-made relaxations (exact for stable neuron pairs). Any other activation with a
bounded second derivative (GELU, SiLU, Sigmoid, Tanh, ELU, Softplus) is relaxed by `Smooth`,
from two facts that need nothing but sigma, sigma' and sup |sigma''| = K:
  - between grid points a, b of a function g with |g''| <= K, g >= min(g(a), g(b)) - K (b-a)^2 / 8,
    so lines of any slope s get sound intercepts from g = sigma - s z on a grid of [l, u]
    (kinks, where sigma' jumps, are grid points);
  - by the mean value theorem E = sigma'(xi) D with xi between z and z + D: E lies between
    g_lo D and g_hi D for [g_lo, g_hi] the range of sigma' over the hull of both boxes. For the
    small D of a near-identical pair that is far tighter than relaxing the two networks apart;
    per neuron the smaller of that and the independent relaxation is used.
LeakyReLU is a z + (1 - a) relu(z) and reuses ReLU's relaxations. A layer's `Nonlinearity`
applies one activation to each neuron (a residual's skipped values pass through `IDENTITY`).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

GRID = 17  # grid points per interval for the smooth relaxations (kinks added)


class Activation:
    """One elementwise function and its relaxations (see the module docstring)."""

    name = "activation"
    monotone = False
    rounds = True  # computed in a narrow float format its result is rounded (ReLU's never is)

    def __call__(self, z):
        raise NotImplementedError

    def lines(self, l, u):
        raise NotImplementedError

    def interval(self, l, u):
        raise NotImplementedError

    def slopes(self, l, u):
        """Bounds of sigma' (one-sided derivatives included) over [l, u]."""
        raise NotImplementedError

    def exact(self, l, u):
        """Where `lines` are exact (sigma affine on [l, u]): no bound to tighten there."""
        return l >= u

    def exact_difference(self, l, u, lp, up):
        """Where `differences` is exact whatever D's bounds are (no need to tighten them)."""
        return torch.zeros_like(l, dtype=torch.bool)

    def gap(self, l, u):
        """How loose `lines` are on [l, u]: the largest distance between them."""
        return _line_gap(self.lines(l, u), l, u)

    def differences(self, l, u, lp, up, dl, du):
        """(lo_p, up_p, lo_q, up_q, lo_r, up_r): lo_p D + lo_q z + lo_r <= E <= up_p D + up_q z + up_r."""
        gl, gu = self.slopes(torch.minimum(l, lp), torch.maximum(u, up))
        mean_value = _mean_value_lines(gl, gu, dl, du)
        gap = (gu - gl) * torch.maximum(dl.abs(), du.abs())
        return _prefer_independent(gap, mean_value, self, l, u, lp, up)

    def difference_interval(self, l, u, lp, up, dl, du):
        gl, gu = self.slopes(torch.minimum(l, lp), torch.maximum(u, up))
        corners = torch.stack([gl * dl, gl * du, gu * dl, gu * du])
        (a_lo, a_hi), (b_lo, b_hi) = self.interval(l, u), self.interval(lp, up)
        return torch.maximum(corners.amin(0), b_lo - a_hi), torch.minimum(corners.amax(0), b_hi - a_lo)


def _mean_value_lines(gl, gu, dl, du):
    """Lines of {g D : g in [gl, gu]} over D in [dl, du]: g D between gl D and gu D (ordered by
    D's sign), chords of the concave min / convex max where D changes sign."""
    zero = torch.zeros_like(dl)
    width = (du - dl).clamp_min(1e-300)
    crossing = (dl < 0) & (du > 0)
    lo_chord = (gl * du - gu * dl) / width
    up_chord = (gu * du - gl * dl) / width
    lo_p = torch.where(du <= 0, gu, torch.where(dl >= 0, gl, lo_chord))
    up_p = torch.where(du <= 0, gl, torch.where(dl >= 0, gu, up_chord))
    lo_r = torch.where(crossing, gu * dl - lo_chord * dl, zero)
    up_r = torch.where(crossing, gl * dl - up_chord * dl, zero)
    return lo_p, up_p, zero, zero.clone(), lo_r, up_r


def _line_gap(lines, l, u):
    """Largest distance between the upper and the lower line over [l, u] (at an end)."""
    lo_s, lo_c, up_s, up_c = lines
    return torch.maximum((up_s - lo_s) * l + up_c - lo_c, (up_s - lo_s) * u + up_c - lo_c)


def _prefer_independent(gap, joint, activation, l, u, lp, up):
    """Per neuron, E = sigma(z') - sigma(z) relaxed one network at a time (z' = z + D):
    E >= lo'(z + D) - up(z) and E <= up'(z + D) - lo(z), where its gap is smaller than the joint
    relaxation's (models that genuinely differ)."""
    a_lo_s, a_lo_c, a_up_s, a_up_c = activation.lines(l, u)
    b_lo_s, b_lo_c, b_up_s, b_up_c = activation.lines(lp, up)
    independent = (b_lo_s, b_up_s, b_lo_s - a_up_s, b_up_s - a_lo_s, b_lo_c - a_up_c, b_up_c - a_lo_c)
    use = activation.gap(l, u) + activation.gap(lp, up) < gap
    return tuple(torch.where(use, i, j) for i, j in zip(independent, joint))


class ReLU(Activation):
    name = "relu"
    monotone = True
    rounds = False  # exact in every format and on every quantisation grid

    def __call__(self, z):
        return torch.relu(z)

    def lines(self, l, u):
        active, inactive = l >= 0, u <= 0
        unstable = ~(active | inactive)
        upper = torch.where(unstable, u / (u - l).clamp_min(1e-300), active.to(l.dtype))
        intercept = torch.where(unstable, -upper * l, torch.zeros_like(l))
        lower = torch.where(unstable, (u > -l).to(l.dtype), active.to(l.dtype))
        return lower, torch.zeros_like(l), upper, intercept

    def interval(self, l, u):
        return l.clamp_min(0), u.clamp_min(0)

    def slopes(self, l, u):
        return (l >= 0).to(l.dtype), (u > 0).to(l.dtype)

    def exact(self, l, u):
        return (l >= 0) | (u <= 0)

    def exact_difference(self, l, u, lp, up):
        return self.exact(l, u) & self.exact(lp, up)

    def differences(self, l, u, lp, up, dl, du):
        """Chords of min(D, 0) <= E <= max(D, 0), exact when both neurons are stable."""
        zero = torch.zeros_like(l)
        lo_p, up_p, lo_q, up_q, lo_r, up_r = _mean_value_lines(zero, torch.ones_like(l), dl, du)
        exact = [((l >= 0) & (lp >= 0), 1.0, 0.0),  # both active: E = D
                 ((u <= 0) & (up <= 0), 0.0, 0.0),  # both inactive: E = 0
                 ((l >= 0) & (up <= 0), 0.0, -1.0),  # a active, b inactive: E = -z
                 ((u <= 0) & (lp >= 0), 1.0, 1.0)]  # a inactive, b active: E = z + D
        for mask, p, q in exact:
            lo_p, up_p = torch.where(mask, p, lo_p), torch.where(mask, p, up_p)
            lo_q, up_q = torch.where(mask, q, lo_q), torch.where(mask, q, up_q)
            lo_r, up_r = torch.where(mask, 0.0, lo_r), torch.where(mask, 0.0, up_r)
        crossing = (dl < 0) & (du > 0)
        gap = torch.where(crossing, -2 * dl * du / (du - dl).clamp_min(1e-300), torch.maximum(dl.abs(), du.abs()))
        for mask, _, _ in exact:
            gap = torch.where(mask, zero, gap)
        return _prefer_independent(gap, (lo_p, up_p, lo_q, up_q, lo_r, up_r), self, l, u, lp, up)

    def gap(self, l, u):  # the triangle's height: how far the upper line can be above relu
        return torch.where((l < 0) & (u > 0), -l * u / (u - l).clamp_min(1e-300), torch.zeros_like(l))

    def difference_interval(self, l, u, lp, up, dl, du):
        # E lies between min(D, 0) and max(D, 0) and in relu(z') - relu(z)
        return (torch.maximum(dl.clamp_max(0), lp.clamp_min(0) - u.clamp_min(0)),
                torch.minimum(du.clamp_min(0), up.clamp_min(0) - l.clamp_min(0)))


class Identity(Activation):
    """A value that passes a layer boundary unchanged (a residual's skip connection)."""

    name = "identity"
    monotone = True
    rounds = False

    def __call__(self, z):
        return z

    def lines(self, l, u):
        one, zero = torch.ones_like(l), torch.zeros_like(l)
        return one, zero, one, zero

    def interval(self, l, u):
        return l, u

    def slopes(self, l, u):
        return torch.ones_like(l), torch.ones_like(l)

    def exact(self, l, u):
        return torch.ones_like(l, dtype=torch.bool)

    def exact_difference(self, l, u, lp, up):
        return torch.ones_like(l, dtype=torch.bool)

    def differences(self, l, u, lp, up, dl, du):
        one, zero = torch.ones_like(l), torch.zeros_like(l)
        return one, one, zero, zero, zero, zero

    def difference_interval(self, l, u, lp, up, dl, du):
        return dl, du


RELU_FN, IDENTITY = ReLU(), Identity()


class LeakyReLU(Activation):
    """a z + (1 - a) relu(z), 0 <= a <= 1: ReLU's relaxations scaled and shifted."""

    monotone = True

    def __init__(self, slope):
        self.slope = float(slope)
        self.name = f"leaky_relu({self.slope:g})"

    def __call__(self, z):
        return torch.where(z >= 0, z, self.slope * z)

    def _mix(self, relu_part, linear_part):
        return linear_part * self.slope + relu_part * (1 - self.slope)

    def lines(self, l, u):
        lo_s, lo_c, up_s, up_c = RELU_FN.lines(l, u)
        return self._mix(lo_s, 1.0), (1 - self.slope) * lo_c, self._mix(up_s, 1.0), (1 - self.slope) * up_c

    def interval(self, l, u):
        return self(l), self(u)

    def slopes(self, l, u):
        gl, gu = RELU_FN.slopes(l, u)
        return self._mix(gl, 1.0), self._mix(gu, 1.0)

    def exact(self, l, u):
        return RELU_FN.exact(l, u)

    def exact_difference(self, l, u, lp, up):
        return RELU_FN.exact_difference(l, u, lp, up)

    def differences(self, l, u, lp, up, dl, du):
        lo_p, up_p, lo_q, up_q, lo_r, up_r = RELU_FN.differences(l, u, lp, up, dl, du)
        c = 1 - self.slope
        return (self._mix(lo_p, 1.0), self._mix(up_p, 1.0), c * lo_q, c * up_q, c * lo_r, c * up_r)

    def difference_interval(self, l, u, lp, up, dl, du):
        lo, hi = RELU_FN.difference_interval(l, u, lp, up, dl, du)
        return self.slope * dl + (1 - self.slope) * lo, self.slope * du + (1 - self.slope) * hi


class Smooth(Activation):
    """An activation with |sigma''| <= `curvature` away from `kinks` (where sigma' may jump;
    `kink_slopes` lists both one-sided derivatives there)."""

    def __init__(self, name, fn, derivative, curvature, monotone=False, kinks=(), kink_slopes=()):
        self.name, self.fn, self.derivative = name, fn, derivative
        self.curvature, self.monotone = float(curvature), monotone
        self.kinks, self.kink_slopes = tuple(kinks), tuple(kink_slopes)

    def __call__(self, z):
        return self.fn(z)

    def _grid(self, l, u):
        """Points [..., G] spanning [l, u] (kinks inside included, sorted) and the widest spacing."""
        t = torch.linspace(0, 1, GRID, dtype=l.dtype)
        points = l.unsqueeze(-1) + (u - l).unsqueeze(-1) * t
        if self.kinks:
            kinks = torch.tensor(self.kinks, dtype=l.dtype)
            points = torch.cat([points, torch.maximum(torch.minimum(kinks, u.unsqueeze(-1)), l.unsqueeze(-1))], -1)
            points = points.sort(-1).values
        return points, (u - l) / (GRID - 1)

    def _sag(self, step):
        return self.curvature * step * step / 8

    def interval(self, l, u):
        if self.monotone:
            return self.fn(l), self.fn(u)
        points, step = self._grid(l, u)
        values, sag = self.fn(points), self._sag(step)
        return values.amin(-1) - sag, values.amax(-1) + sag

    def slopes(self, l, u):
        points, step = self._grid(l, u)
        d = self.derivative(points)
        lo, hi = d.amin(-1) - self.curvature * step / 2, d.amax(-1) + self.curvature * step / 2
        for kink, (left, right) in zip(self.kinks, self.kink_slopes):
            inside = (l <= kink) & (u >= kink)
            lo = torch.where(inside, torch.minimum(lo, min(left, right) - self.curvature * step / 2), lo)
            hi = torch.where(inside, torch.maximum(hi, max(left, right) + self.curvature * step / 2), hi)
        return lo, hi

    def lines(self, l, u):
        """Per bound, the slope (chord, tangent at either end or the middle) whose line lies
        closest to sigma on average; intercepts from the grid, lowered by the sag between points."""
        points, step = self._grid(l, u)
        values, sag = self.fn(points), self._sag(step)
        chord = (self.fn(u) - self.fn(l)) / (u - l).clamp_min(1e-300)
        chord = torch.where(u > l, chord, self.derivative(l))
        candidates = torch.stack([chord, self.derivative(l), self.derivative(u), self.derivative((l + u) / 2)])
        g = values.unsqueeze(0) - candidates.unsqueeze(-1) * points.unsqueeze(0)  # [4, ..., G]
        low, high, mean = g.amin(-1) - sag, g.amax(-1) + sag, g.mean(-1)
        pick_lo = (mean - low).argmin(0, keepdim=True)
        pick_up = (high - mean).argmin(0, keepdim=True)
        take = lambda x, i: x.gather(0, i).squeeze(0)
        return take(candidates, pick_lo), take(low, pick_lo), take(candidates, pick_up), take(high, pick_up)


def _gelu_derivative(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _derivative_of(fn):
    def derivative(z):
        with torch.enable_grad():
            x = z.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(x).sum(), x)
        return g.detach()
    return derivative


def _gelu_tanh(z):
    return torch.nn.functional.gelu(z, approximate="tanh")


# sup |sigma''| with a margin (checked against dense sampling in tests/test_relaxations.py)
SMOOTH: Dict[str, Activation] = {
    "gelu": Smooth("gelu", torch.nn.functional.gelu, _gelu_derivative, 0.80),
    "gelu_tanh": Smooth("gelu_tanh", _gelu_tanh, _derivative_of(_gelu_tanh), 0.80),
    "silu": Smooth("silu", torch.nn.functional.silu, _derivative_of(torch.nn.functional.silu), 0.51),
    "sigmoid": Smooth("sigmoid", torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), 0.097,
                      monotone=True),
    "tanh": Smooth("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, 0.77, monotone=True),
    "softplus": Smooth("softplus", torch.nn.functional.softplus, torch.sigmoid, 0.251, monotone=True),
}


def elu(alpha):
    """ELU with this alpha (> 0): alpha (e^z - 1) below 0, z above; sigma'' <= alpha."""
    alpha = float(alpha)
    fn = lambda z: torch.nn.functional.elu(z, alpha)
    derivative = lambda z: torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z.clamp_max(0)))
    kinks = () if alpha == 1.0 else (0.0,)
    return Smooth(f"elu({alpha:g})", fn, derivative, alpha * 1.001, monotone=True, kinks=kinks,
                  kink_slopes=((alpha, 1.0),) if kinks else ())


@dataclass(frozen=True)
class Nonlinearity:
    """The activations applied at one layer boundary: `parts` pairs an activation with the mask
    of the neurons it applies to (None: all of them)."""

    parts: Tuple[Tuple[Activation, Optional[torch.Tensor]], ...]

    @classmethod
    def of(cls, activation):
        return cls(((activation, None),))

    @property
    def activations(self):
        return [a for a, _ in self.parts]

    @property
    def is_relu(self):
        return all(isinstance(a, ReLU) for a in self.activations)

    def _combine(self, method, *args):
        """`method` of each part's activation on the whole tensors, each neuron taking its own."""
        out = None
        for activation, mask in self.parts:
            values = getattr(activation, method)(*args) if method else activation(*args)
            if mask is None or out is None:
                out = values
                continue
            if isinstance(values, tuple):
                out = tuple(torch.where(mask, v, o) for v, o in zip(values, out))
            else:
                out = torch.where(mask, values, out)
        return out

    def __call__(self, z):
        return self._combine(None, z)

    def lines(self, l, u):
        return self._combine("lines", l, u)

    def interval(self, l, u):
        return self._combine("interval", l, u)

    def exact(self, l, u):
        return self._combine("exact", l, u)

    def exact_difference(self, l, u, lp, up):
        return self._combine("exact_difference", l, u, lp, up)

    def differences(self, l, u, lp, up, dl, du):
        return self._combine("differences", l, u, lp, up, dl, du)

    def difference_interval(self, l, u, lp, up, dl, du):
        return self._combine("difference_interval", l, u, lp, up, dl, du)

    @property
    def uniform(self):
        """One activation for all neurons (so pruned neurons can be padded in)."""
        return all(mask is None for _, mask in self.parts)

    def same_as(self, other):
        """The same activation on every neuron."""
        same_mask = lambda m, n: m is n if m is None or n is None else torch.equal(m, n)
        return len(self.parts) == len(other.parts) and all(
            a.name == b.name and same_mask(m, n) for (a, m), (b, n) in zip(self.parts, other.parts))


RELU = Nonlinearity.of(RELU_FN)

# activation modules by exact type: a function of the module giving its Activation
MODULES: Dict[type, Callable] = {
    torch.nn.ReLU: lambda m: RELU_FN,
    torch.nn.GELU: lambda m: SMOOTH["gelu_tanh" if m.approximate == "tanh" else "gelu"],
    torch.nn.SiLU: lambda m: SMOOTH["silu"],
    torch.nn.Sigmoid: lambda m: SMOOTH["sigmoid"],
    torch.nn.Tanh: lambda m: SMOOTH["tanh"],
    torch.nn.Softplus: lambda m: SMOOTH["softplus"] if (m.beta, m.threshold) == (1.0, 20.0) else None,
    torch.nn.LeakyReLU: lambda m: LeakyReLU(m.negative_slope) if 0 <= m.negative_slope <= 1 else None,
    torch.nn.ELU: lambda m: elu(m.alpha) if m.alpha > 0 else None,
}


def of_module(module):
    """The `Activation` an activation module computes, or None."""
    make = MODULES.get(type(module))
    return None if make is None else make(module)


def of_function(target, args, kwargs):
    """The `Activation` a traced call computes (torch.relu, F.gelu(x, approximate=...), x.sigmoid()
    ...), or None."""
    f = torch.nn.functional
    name = getattr(target, "__name__", target)
    if target in (torch.relu, f.relu) or name == "relu":
        return RELU_FN
    if target is f.gelu or name == "gelu":
        return SMOOTH["gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu"]
    if target in (f.silu,) or name == "silu":
        return SMOOTH["silu"]
    if target in (torch.sigmoid, f.sigmoid) or name == "sigmoid":
        return SMOOTH["sigmoid"]
    if target in (torch.tanh, f.tanh) or name == "tanh":
        return SMOOTH["tanh"]
    if target is f.leaky_relu:
        slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
        return LeakyReLU(slope) if 0 <= slope <= 1 else None
    return None
