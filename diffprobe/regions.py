"""Input regions: boxes and Lp balls (clipped to a valid input box) as small frozen value types.

A region is shared by both halves of diffprobe: the search projects onto it and samples from it,
the certifier asks it for its bounding box and its perturbation, so the two never disagree about
what the region is. Shapes are per sample (no batch dimension); methods take batched tensors.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from .errors import RegionError

_INF = float("inf")
ArrayLike = Union[torch.Tensor, Sequence[float], float]


def _as_tensor(v, like=None):
    t = torch.as_tensor(v, dtype=torch.float64)
    return t.expand_as(like).clone() if like is not None and t.dim() == 0 else t


@dataclass(frozen=True, eq=False)
class Box:
    """All x with lower <= x <= upper elementwise."""

    lower: torch.Tensor
    upper: torch.Tensor

    def __post_init__(self):
        lo, hi = _as_tensor(self.lower), _as_tensor(self.upper)
        lo, hi = torch.broadcast_tensors(lo, hi)
        if torch.isnan(lo).any() or torch.isnan(hi).any():
            raise RegionError("region bounds contain NaN")
        if (lo > hi).any():
            k = int((lo > hi).reshape(-1).nonzero()[0])
            raise RegionError(f"region is empty: lower > upper at input {k} "
                              f"({lo.reshape(-1)[k].item():g} > {hi.reshape(-1)[k].item():g})")
        object.__setattr__(self, "lower", lo.clone())
        object.__setattr__(self, "upper", hi.clone())

    norm = _INF

    @property
    def shape(self):
        return tuple(self.lower.shape)

    @property
    def center(self):
        return (self.lower + self.upper) / 2

    def bounding_box(self):
        return self.lower, self.upper

    def contains(self, x, tol=1e-6):
        """Per-sample booleans for a batch x of shape [batch, *shape]."""
        lo, hi = self.lower.to(x), self.upper.to(x)
        return ((x >= lo - tol) & (x <= hi + tol)).reshape(x.shape[0], -1).all(1)

    def project(self, x):
        return torch.maximum(torch.minimum(x, self.upper.to(x)), self.lower.to(x))

    def sample(self, n, generator=None):
        u = torch.rand((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.lower + u * (self.upper - self.lower)

    def corners(self, n, generator=None):
        """n random vertices of the box (the search starts some restarts there)."""
        bits = torch.rand((n, *self.shape), generator=generator, dtype=torch.float64) < 0.5
        return torch.where(bits, self.upper, self.lower)

    def reshape(self, shape):
        return Box(self.lower.reshape(shape), self.upper.reshape(shape))

    # --- what search and certification ask of a region ----------------------------------------

    is_box = True  # the region is its bounding box: input splitting and exact MILPs apply

    def ascent(self, grad):
        """The steepest-ascent direction of unit size in this region's norm: the gradient's sign."""
        return grad.sign()

    def step_scale(self, dtype):
        """The length a unit ascent step is scaled by: half of each side."""
        return ((self.upper - self.lower) / 2).to(dtype)

    def mutation(self, n, generator):
        """n random moves that reach across the region: uniform in the box's extent."""
        return (self.upper - self.lower) * (torch.rand((n, *self.shape), generator=generator, dtype=torch.float64) * 2 - 1)

    def perturbation(self, lirpa, lo, hi):
        """The region as auto_LiRPA's input perturbation over the boxes [lo, hi]."""
        return lirpa.BoundedTensor((lo + hi) / 2, lirpa.PerturbationLpNorm(norm=float("inf"), x_L=lo, x_U=hi))

    @staticmethod
    def stacked(regions):
        """Regions of this kind bounded in one batch (their bounding boxes carry everything), or None."""
        return regions[0] if all(r.is_box for r in regions) else None

    def take(self, index):
        """The part of a stacked batch at `index`: for boxes, the bounding boxes say it all."""
        return self

    def split(self, dim):
        """The two halves of the box cut across flattened input dimension `dim`."""
        mid = self.center.reshape(-1)[dim]
        lo_hi, hi_lo = self.upper.clone().reshape(-1), self.lower.clone().reshape(-1)
        lo_hi[dim], hi_lo[dim] = mid, mid
        return (Box(self.lower, lo_hi.reshape(self.shape)), Box(hi_lo.reshape(self.shape), self.upper))

    def describe(self):
        width = (self.upper - self.lower).max().item()
        return f"box over {list(self.shape)} inputs, widest side {width:.4g}"

    def to_dict(self):
        return {"type": "box", "lower": self.lower.reshape(-1).tolist(),
                "upper": self.upper.reshape(-1).tolist(), "shape": list(self.shape)}

    def __repr__(self):
        return f"Box({self.describe()})"


def _clip_box(center, clip):
    if clip is None:
        return torch.full_like(center, -_INF), torch.full_like(center, _INF)
    lo, hi = clip
    return _as_tensor(lo, center), _as_tensor(hi, center)


def _check_ball(center, eps, clip):
    if not math.isfinite(eps) or eps < 0:
        raise RegionError(f"eps must be a finite number >= 0, got {eps}; pass e.g. eps=0.01")
    lo, hi = _clip_box(center, clip)
    if (lo > hi).any():
        raise RegionError("clip range is empty: LO > HI")
    if ((center < lo) | (center > hi)).any():
        raise RegionError("the center lies outside the clip= range; clip the center first or widen clip=")


@dataclass(frozen=True, eq=False)
class LinfBall(Box):
    """{x : |x - center|_inf <= eps} intersected with the clip box; a box in disguise."""

    def __init__(self, center, eps, clip=None):
        center = _as_tensor(center)
        _check_ball(center, float(eps), clip)
        lo, hi = _clip_box(center, clip)
        object.__setattr__(self, "ball_center", center)
        object.__setattr__(self, "eps", float(eps))
        object.__setattr__(self, "clip", None if clip is None else tuple(float(c) for c in clip))
        super().__init__(torch.maximum(center - eps, lo), torch.minimum(center + eps, hi))

    def describe(self):
        clip = f", clipped to {list(self.clip)}" if self.clip else ""
        return f"L-inf ball of radius {self.eps:g} over {list(self.shape)} inputs{clip}"

    def to_dict(self):
        return {**super().to_dict(), "type": "linf", "eps": self.eps, "clip": self.clip,
                "center": self.ball_center.reshape(-1).tolist()}

    def __repr__(self):
        return f"LinfBall({self.describe()})"


@dataclass(frozen=True, eq=False)
class L2Ball:
    """{x : |x - center|_2 <= eps} intersected with the clip box."""

    center: torch.Tensor
    eps: float
    clip: Optional[Tuple[float, float]] = None

    norm = 2.0

    def __post_init__(self):
        center = _as_tensor(self.center)
        _check_ball(center, float(self.eps), self.clip)
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "eps", float(self.eps))
        if self.clip is not None:
            object.__setattr__(self, "clip", tuple(float(c) for c in self.clip))

    @property
    def shape(self):
        return tuple(self.center.shape)

    def bounding_box(self):
        lo, hi = _clip_box(self.center, self.clip)
        return torch.maximum(self.center - self.eps, lo), torch.minimum(self.center + self.eps, hi)

    def contains(self, x, tol=1e-6):
        lo, hi = (t.to(x) for t in self.bounding_box())
        dist = (x - self.center.to(x)).reshape(x.shape[0], -1).norm(dim=1)
        inside = ((x >= lo - tol) & (x <= hi + tol)).reshape(x.shape[0], -1).all(1)
        return inside & (dist <= self.eps * (1 + 1e-9) + tol)

    def project(self, x, iterations=60):
        if x.shape[0] == 0:
            return x
        """Exact Euclidean projection onto ball ∩ box: clip((x + λc) / (1 + λ)) with λ >= 0
        found by bisection, since the clip keeps the distance to c monotone in λ."""
        c = self.center.to(x)
        lo, hi = (t.to(x) for t in _clip_box(self.center, self.clip))
        flat = lambda t: t.reshape(t.shape[0], -1)
        point = lambda lam: torch.clamp((x + lam * c) / (1 + lam), lo, hi)
        dist = lambda lam: flat(point(lam) - c).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
        lam_lo = torch.zeros_like(dist(torch.zeros(1, dtype=x.dtype)))
        if bool((dist(lam_lo) <= self.eps).all()):
            return point(lam_lo)
        lam_hi = torch.ones_like(lam_lo)
        while bool((dist(lam_hi) > self.eps).any()) and float(lam_hi.max()) < 1e30:
            lam_hi = torch.where(dist(lam_hi) > self.eps, lam_hi * 4, lam_hi)
        for _ in range(iterations):
            mid = (lam_lo + lam_hi) / 2
            too_far = dist(mid) > self.eps
            lam_lo, lam_hi = torch.where(too_far, mid, lam_lo), torch.where(too_far, lam_hi, mid)
        return point(lam_hi)

    def sample(self, n, generator=None):
        """Uniform in the ball, then clipped (clipping towards a box that holds the centre
        only shortens every coordinate's distance to it, so samples stay in the ball)."""
        d = self.center.numel()
        direction = torch.randn((n, d), generator=generator, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
        radius = self.eps * torch.rand((n, 1), generator=generator, dtype=torch.float64) ** (1 / d)
        x = (self.center.reshape(1, -1) + radius * direction).reshape(n, *self.shape)
        lo, hi = _clip_box(self.center, self.clip)
        return torch.clamp(x, lo, hi)

    def corners(self, n, generator=None):
        """Points on the sphere, projected into the clip box."""
        if n == 0:
            return self.center.new_zeros((0, *self.shape))
        d = self.center.numel()
        direction = torch.randn((n, d), generator=generator, dtype=torch.float64)
        direction = self.eps * direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return self.project((self.center.reshape(1, -1) + direction).reshape(n, *self.shape))

    def reshape(self, shape):
        return L2Ball(self.center.reshape(shape), self.eps, self.clip)

    is_box = False

    def ascent(self, grad):
        """The normalised gradient: the steepest-ascent direction of unit L2 length."""
        flat = grad.reshape(grad.shape[0], -1)
        return grad / flat.norm(dim=1).clamp_min(1e-30).reshape(-1, *[1] * (grad.dim() - 1))

    def step_scale(self, dtype):
        return torch.tensor(self.eps, dtype=dtype)

    def mutation(self, n, generator):
        """Random directions of length up to the diameter (a box-shaped move is ~sqrt(d/3) times
        longer than its size per input, so in 784 dimensions any radius would land on an arbitrary
        point of the sphere instead of near the best point)."""
        direction = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        length = 2 * self.eps * torch.rand(n, generator=generator, dtype=torch.float64)
        return direction * (length / direction.reshape(n, -1).norm(dim=1)).reshape(-1, *[1] * len(self.shape))

    def perturbation(self, lirpa, lo, hi):
        """The ball itself (a batch of balls of one radius: their centres stacked)."""
        center = self.center.to(lo.dtype)
        center = center if center.dim() == lo.dim() else center.unsqueeze(0)
        return lirpa.BoundedTensor(center, lirpa.PerturbationLpNorm(norm=2, eps=self.eps))

    @staticmethod
    def stacked(regions):
        """Balls of one radius and clip as one region of stacked centres, or None."""
        first = regions[0]
        if all(isinstance(r, L2Ball) and r.eps == first.eps and r.clip == first.clip for r in regions):
            return L2Ball(torch.stack([r.center for r in regions]), first.eps, first.clip)
        return None

    def take(self, index):
        """The stacked balls at `index`."""
        return L2Ball(self.center[index], self.eps, self.clip)

    def describe(self):
        clip = f", clipped to {list(self.clip)}" if self.clip else ""
        return f"L2 ball of radius {self.eps:g} over {list(self.shape)} inputs{clip}"

    def to_dict(self):
        return {"type": "l2", "center": self.center.reshape(-1).tolist(), "eps": self.eps,
                "clip": self.clip, "shape": list(self.shape)}

    def __repr__(self):
        return f"L2Ball({self.describe()})"


Region = Union[Box, LinfBall, "L2Ball"]
"""Any region: a box, an L-inf ball (a box) or an L2 ball, each clipped to its valid range."""


def ball(center: ArrayLike, eps: float, norm: Union[str, float] = "inf",
         clip: Optional[Tuple[float, float]] = None) -> Region:
    """An L-inf or L2 ball; `norm` is 'inf' or '2'."""
    norm = str(norm).lower().removesuffix(".0")
    if norm in ("inf", "linf"):
        return LinfBall(center, eps, clip)
    if norm in ("2", "l2"):
        return L2Ball(_as_tensor(center), eps, clip)
    raise RegionError(f"unknown norm '{norm}'; use inf or 2")


def vnnlib_text(path):
    """A VNN-LIB file's text; gzipped ones (as VNN-COMP ships them) are read inflated, to the same limit."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_VNNLIB_BYTES + 1)
    if data[:2] == b"\x1f\x8b":
        import gzip
        with gzip.open(path, "rb") as handle:
            data = handle.read(MAX_VNNLIB_BYTES + 1)
    if len(data) > MAX_VNNLIB_BYTES:
        raise RegionError(f"{path} holds more than {MAX_VNNLIB_BYTES >> 20} MB of VNN-LIB")
    return data.decode(errors="replace")


def _input_index(var, n, path):
    if not re.fullmatch(r"X_\d+", var) or int(var[2:]) >= n:
        raise RegionError(f"{path} bounds {var}, which is not one of its declared inputs X_0..X_{n - 1}")
    return int(var[2:])


def _number(text, path):
    try:
        value = float(text)
    except ValueError:
        raise RegionError(f"{path}: '{text}' is not a number") from None
    if math.isnan(value):
        raise RegionError(f"{path}: a bound is NaN")
    return value


_BOUND = re.compile(r"\(\s*assert\s*\(\s*(<=|>=)\s+(\S+)\s+(\S+?)\s*\)\s*\)")


MAX_VNNLIB_BYTES = 64 << 20  # a property of a million inputs is about 60 MB


def box_from_vnnlib(path: Union[str, Path], inputs: Optional[int] = None) -> Box:
    """The input box of a VNN-LIB property: every X_i needs a lower and an upper bound. With
    `inputs` (the models' input count), a property over another number of inputs is refused
    before its constraints are read."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_VNNLIB_BYTES:
            raise RegionError(f"{path} has {size / 2**20:.0f} MB; diffprobe reads VNN-LIB files of at most "
                              f"{MAX_VNNLIB_BYTES >> 20} MB")
        text = vnnlib_text(path)
    except OSError as exc:
        raise RegionError(f"cannot read VNN-LIB file {path}: {exc.strerror or exc}") from exc
    text = re.sub(r";[^\n]*", "", text)
    declared = [int(i) for i in re.findall(r"declare-const\s+X_(\d+)\b", text)]
    n = len(declared)
    if n == 0:
        raise RegionError(f"{path} declares no input X_i; is it a VNN-LIB property?")
    if sorted(declared) != list(range(n)):
        raise RegionError(f"{path} declares inputs {sorted(set(declared) - set(range(n)))[:5]} beyond X_0..X_{n - 1} "
                          "or repeats one; inputs must be X_0, X_1, ... without gaps")
    if inputs is not None and n != inputs:
        raise RegionError(f"{path} declares {n} inputs but the models take {inputs}")
    lo, hi = torch.full((n,), -_INF, dtype=torch.float64), torch.full((n,), _INF, dtype=torch.float64)
    for op, left, right in _BOUND.findall(text):
        var, value, flipped = (left, right, False) if left.startswith("X_") else (right, left, True)
        if not var.startswith("X_"):
            continue
        i, v = _input_index(var, n, path), _number(value, path)
        upper = (op == "<=") != flipped
        lo[i], hi[i] = (lo[i], min(hi[i].item(), v)) if upper else (max(lo[i].item(), v), hi[i])
    unbounded = [i for i in range(n) if not (math.isfinite(lo[i]) and math.isfinite(hi[i]))]
    if unbounded:
        raise RegionError(f"{path}: inputs {unbounded[:10]} lack a lower or upper bound")
    return Box(lo, hi)
