"""The exact maximum of max_k |model_b(x)_k - model_a(x)_k| over a box, by mixed-integer linear
programming (scipy.optimize.milp, big-M encoding of every ReLU of both networks).

Exponential in the number of unstable ReLUs, so only for tiny pairs (a few layers of <= ~20
ReLUs): the test oracle and benchmark reference for search (found <= exact) and certification
(exact <= bound).
"""
from dataclasses import dataclass, replace

import numpy as np

from . import quantized  # noqa: F401  (registers the quantised modules' stages with lowering)
from .errors import DiffprobeError, UnsupportedOperationError
from .graph import compose, fit_region
from .lowering import Declined, lower, relu_only


@dataclass(frozen=True)
class ExactMax:
    value: float
    x: list  # the maximiser, flattened
    output: int  # the output k and sign s of the maximum s * (b_k - a_k)
    sign: int
    problems: int  # MILPs solved


class _Program:
    """Variables and constraints of one MILP, built row by row."""

    def __init__(self):
        self.lower, self.upper, self.integer = [], [], []
        self.rows, self.row_lo, self.row_hi = [], [], []

    def variables(self, lo, hi, integer=False):
        start = len(self.lower)
        self.lower += list(lo)
        self.upper += list(hi)
        self.integer += [int(integer)] * len(lo)
        return np.arange(start, start + len(lo))

    def constrain(self, coefficients, lo, hi):
        """lo <= sum(c * var) <= hi, with coefficients a dict var -> c."""
        self.rows.append(coefficients)
        self.row_lo.append(lo)
        self.row_hi.append(hi)


def _encode(program, chain, x_vars, lo, hi):
    """Add one network's layers on the input variables; returns its output variables."""
    h_vars, h_lo, h_hi = x_vars, lo, hi
    for index, layer in enumerate(chain):
        w, b = layer.weight.numpy(), layer.bias.numpy()
        center, radius = w @ ((h_lo + h_hi) / 2) + b, np.abs(w) @ ((h_hi - h_lo) / 2)
        z_lo, z_hi = center - radius, center + radius
        z_vars = program.variables(z_lo, z_hi)
        for i, z in enumerate(z_vars):  # z = W h + b
            coefficients = {int(v): -float(c) for v, c in zip(h_vars, w[i]) if c != 0}
            coefficients[int(z)] = 1.0
            program.constrain(coefficients, float(b[i]), float(b[i]))
        if index == len(chain) - 1:
            return z_vars
        h_lo, h_hi = np.maximum(z_lo, 0), np.maximum(z_hi, 0)
        h_vars = program.variables(h_lo, h_hi)
        for z, h, l, u in zip(z_vars, h_vars, z_lo, z_hi):
            z, h = int(z), int(h)
            if l >= 0:
                program.constrain({h: 1.0, z: -1.0}, 0.0, 0.0)
            elif u <= 0:
                program.constrain({h: 1.0}, 0.0, 0.0)
            else:  # h >= z, h <= z - l (1 - d), h <= u d
                d = int(program.variables([0.0], [1.0], integer=True)[0])
                program.constrain({h: 1.0, z: -1.0}, 0.0, np.inf)
                program.constrain({h: 1.0, z: -1.0, d: -float(l)}, -np.inf, -float(l))
                program.constrain({h: 1.0, d: -float(u)}, -np.inf, 0.0)
    return h_vars


def exact_max(model_a, model_b, region, *, time_limit=60.0):
    """The exact maximum over a box region of max_k |b_k(x) - a_k(x)| for two chains of affine layers
    and ReLUs, in exact arithmetic on their stored weights."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix
    if not region.is_box:
        raise UnsupportedOperationError(["an L2 ball"], what="the MILP oracle", hint="give a box or L-inf ball")
    pair = compose(model_a, model_b, region)
    region = fit_region(region, pair.input_shape)
    try:
        chains = [lower(m, pair.input_shape, exact=True).layers() for m in (pair.model_a, pair.model_b)]
    except Declined as why:
        chains = [None, str(why)]
    if not any(c is None or isinstance(c, str) for c in chains) and not all(map(relu_only, chains)):
        chains = [None, "an activation other than ReLU"]
    if any(c is None or isinstance(c, str) for c in chains):
        raise UnsupportedOperationError([chains[1] if isinstance(chains[1], str) else "a model that is not an "
                                         "affine/ReLU chain"], what="the MILP oracle",
                                        hint="it encodes chains of Linear/Conv/BatchNorm/AvgPool layers and ReLUs only")
    lo, hi = (t.reshape(-1).double().numpy() for t in region.bounding_box())
    program = _Program()
    x_vars = program.variables(lo, hi)
    out_a = _encode(program, chains[0], x_vars, lo, hi)
    out_b = _encode(program, chains[1], x_vars, lo, hi)
    size = len(program.lower)
    matrix = lil_matrix((len(program.rows), size))
    for r, coefficients in enumerate(program.rows):
        for v, c in coefficients.items():
            matrix[r, v] = c
    constraints = LinearConstraint(matrix.tocsr(), program.row_lo, program.row_hi)
    bounds, integrality = Bounds(program.lower, program.upper), np.array(program.integer)
    best = None
    for k in range(len(out_a)):
        for sign in (1, -1):
            cost = np.zeros(size)
            cost[out_b[k]], cost[out_a[k]] = -sign, sign  # milp minimises: -(s * (b_k - a_k))
            res = milp(cost, constraints=constraints, bounds=bounds, integrality=integrality,
                       options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
            if res.status != 0:
                raise DiffprobeError(f"the MILP for output {k} did not solve to optimality ({res.message})")
            if best is None or -res.fun > best.value:
                best = ExactMax(-res.fun, res.x[x_vars].tolist(), k, sign, 0)
    return replace(best, problems=2 * len(out_a))
