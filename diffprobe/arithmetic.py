"""Floating-point formats and how far rounding in them can move a value: the error model behind
certificates for the arithmetic a model really runs in.

A deployed model does not compute its formula exactly: an fp16 module rounds its input and every
layer's output to 11 significant bits, an int8 module quantises its activations. diffprobe bounds
that as bounded error terms entering the bound propagation (see `diffprobe.lowering`); this module
knows the formats and the textbook bounds (Higham, *Accuracy and Stability of Numerical
Algorithms*, ch. 2-3):
  - rounding to nearest moves v by at most half a unit in the last place of v's binade, and by half
    the smallest subnormal below the normal range;
  - a sum of n products, accumulated in any order in a format of unit roundoff u, is off by at
    most gamma_n * sum |w_i x_i| with gamma_n = n u / (1 - n u) (so GPU kernels that split or
    reorder the reduction are covered too);
  - a value that can exceed the format's largest finite number can become inf: unbounded.
"""
import math
from dataclasses import dataclass

import torch

from .errors import DiffprobeError

_INF = float("inf")


@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-style binary format: `bits` significant bits (the implicit one included), smallest
    normal exponent `min_exponent`, largest finite value `max_value`."""

    name: str
    dtype: torch.dtype
    bits: int
    min_exponent: int
    max_value: float

    @property
    def unit_roundoff(self):
        return 2.0 ** -self.bits

    @property
    def smallest_subnormal(self):
        return 2.0 ** (self.min_exponent - self.bits + 1)

    def rounding_error(self, magnitude):
        """Largest |fl(v) - v| over |v| <= magnitude (a float64 tensor): half an ulp of the highest
        binade reached (the subnormal spacing below the normal range), inf where v may overflow."""
        magnitude = torch.as_tensor(magnitude, dtype=torch.float64)
        exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0 ** self.min_exponent)))
        error = torch.exp2(exponent - self.bits)
        return torch.where(magnitude < self.max_value, error, torch.full_like(error, _INF))

    def gamma(self, n):
        """gamma_n = n u / (1 - n u) of this format (a tensor or number of terms); inf once n u >= 1."""
        nu = torch.as_tensor(n, dtype=torch.float64) * self.unit_roundoff
        return torch.where(nu < 1, nu / (1 - nu).clamp_min(1e-300), torch.full_like(nu, _INF))


FORMATS = {f.dtype: f for f in (
    FloatFormat("fp64", torch.float64, 53, -1022, torch.finfo(torch.float64).max),
    FloatFormat("fp32", torch.float32, 24, -126, torch.finfo(torch.float32).max),
    FloatFormat("fp16", torch.float16, 11, -14, torch.finfo(torch.float16).max),
    FloatFormat("bf16", torch.bfloat16, 8, -126, torch.finfo(torch.bfloat16).max),
)}
BY_NAME = {f.name: f for f in FORMATS.values()}


def format_of(dtype):
    try:
        return FORMATS[dtype]
    except KeyError:
        raise DiffprobeError(f"no rounding model for {dtype}; diffprobe models fp64, fp32, fp16 "
                             "and bf16 arithmetic") from None


def accumulator_of(fmt):
    """The format sums of products are accumulated in before the result is rounded to `fmt`: fp32
    for fp16 and bf16 (PyTorch's CPU kernels, cuBLAS's default for bf16 and cuDNN), the format
    itself otherwise. README ("What is certified") lists the runtimes this does not cover."""
    return FORMATS[torch.float32] if fmt.bits < 24 else fmt


def dot_error(fmt, terms, abs_sum, magnitude, extra_roundings=0):
    """Bound on |computed - exact| for y = sum_i w_i x_i + b evaluated in `fmt`: accumulated in
    `accumulator_of(fmt)` in any order (gamma over `terms` + 1 + `extra_roundings` operations, plus
    one subnormal per product for underflow), then rounded to `fmt`. `abs_sum` bounds
    sum |w_i x_i| + |b|, `magnitude` bounds |y|; all tensors broadcast together."""
    acc = accumulator_of(fmt)
    terms = torch.as_tensor(terms, dtype=torch.float64)
    error = acc.gamma(terms + 1 + extra_roundings) * abs_sum + terms * acc.smallest_subnormal
    error = torch.where(abs_sum == 0, torch.zeros_like(error), error)  # nothing summed: nothing rounded
    if acc is fmt:
        return torch.where(magnitude + error < fmt.max_value, error, torch.full_like(error, _INF))
    return error + fmt.rounding_error(magnitude + error)


FUNCTION_ULPS = 8  # accuracy assumed of elementwise functions (exp, tanh, erf, ...): PyTorch's kernels are within 1-4


def function_error(fmt, magnitude):
    """Bound on |computed - exact| for an elementwise function's result of at most `magnitude` in
    `fmt`: accurate to FUNCTION_ULPS units in the last place of the accumulator format, then
    rounded to `fmt`."""
    acc = accumulator_of(fmt)
    inner = 2 * FUNCTION_ULPS * acc.unit_roundoff * magnitude + acc.smallest_subnormal
    return inner + fmt.rounding_error(magnitude + inner)


def outward(lower, upper, scale):
    """Bounds computed in float64 rounded outward: by 2^-40 of `scale` (a bound on the magnitudes
    summed when computing them) plus 2^-40 of their own size. A bound is a sum of fewer than 2^13
    rounded float64 operations per term in any network diffprobe lowers, so its own rounding stays
    below gamma_{2^13}(2^-53) < 2^-39.9 of the magnitudes summed; NaN becomes unbounded."""
    pad = 2.0 ** -40 * (scale + torch.maximum(lower.abs(), upper.abs()))
    lower = torch.where(torch.isnan(lower), torch.full_like(lower, -_INF), lower - pad)
    upper = torch.where(torch.isnan(upper), torch.full_like(upper, _INF), upper + pad)
    return lower, upper


def finite_or_inf(value):
    """A scalar bound as a float: NaN means unbounded (+inf)."""
    value = float(value)
    return _INF if math.isnan(value) else value
