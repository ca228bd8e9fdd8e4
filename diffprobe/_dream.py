"""DeepDream mode: a natural-looking input on which two models disagree.

Instead of stepping pixels inside a small ball, the image is parameterised (pixels, a sigmoid of
pixels, or a Fourier spectrum scaled towards low frequencies, with optional colour decorrelation),
optimised with Adam under random jitter / scale / rotation (so the disagreement does not hinge on
one pixel pattern), and regularised by priors such as total variation. The witness reported is the
final, untransformed image, re-evaluated on the real models in float64.
"""
import copy
import math
import time
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .differences import Difference, Objective
from .errors import ArgumentError, ShapeMismatchError
from .graph import compose
from .objectives import as_objective
from .progress import progress_bar
from .regions import Box, Region
from .results import SearchResult
from ._search import objective_of, witness_result

PARAMETERISATIONS = ("pixel", "sigmoid", "fft")
TRANSFORMS = ("jitter", "scale", "rotate")


def image_shape(input_shape):
    """(C, H, W) for the models' input: as is when it has 3 dims, a square for flat inputs."""
    dims = [s for s in input_shape if s != 1] or [1]
    if len(dims) == 3:
        return tuple(dims)
    if len(dims) == 2:
        return (1, *dims)
    side = math.isqrt(dims[0])
    if side * side != dims[0]:
        raise ShapeMismatchError(f"inputs of shape {list(input_shape)} are not images; give image_shape=(C, H, W)")
    return (1, side, side)


class _Image(torch.nn.Module):
    """The trainable parameterisation; forward() gives the image in [lo, hi]."""

    def __init__(self, shape, kind, lo, hi, colour, generator):
        super().__init__()
        self.shape, self.kind, self.lo, self.hi, self.colour = shape, kind, lo, hi, colour
        c, h, w = shape
        if kind == "fft":
            fy = torch.fft.fftfreq(h)[:, None]
            fx = torch.fft.rfftfreq(w)[None, :]
            # 1/f amplitude: natural images' spectrum, so each frequency is learned at its own scale
            self.register_buffer("scale", 1.0 / torch.sqrt(fx ** 2 + fy ** 2).clamp_min(1.0 / max(h, w)))
            self.param = torch.nn.Parameter(0.01 * torch.randn((c, h, w // 2 + 1, 2), generator=generator))
        else:
            self.param = torch.nn.Parameter(0.01 * torch.randn(shape, generator=generator)
                                            + (0.5 if kind == "pixel" else 0.0))

    def forward(self):
        c, h, w = self.shape
        if self.kind == "pixel":
            return self.lo + (self.hi - self.lo) * self.param.clamp(0, 1)
        if self.kind == "sigmoid":
            u = self.param
        else:
            spectrum = torch.view_as_complex(self.param) * self.scale
            u = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho") * 4
        if self.colour is not None:
            u = torch.einsum("cd,dhw->chw", self.colour, u)
        return self.lo + (self.hi - self.lo) * torch.sigmoid(u)


def _transformed(x, transforms, batch, generator):
    """`batch` randomly jittered / scaled / rotated copies of the image x [C, H, W]."""
    c, h, w = x.shape
    out = x.unsqueeze(0).expand(batch, c, h, w)
    if "scale" in transforms or "rotate" in transforms:
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(10) if "rotate" in transforms \
            else torch.zeros(batch)
        scale = 1 + (torch.rand(batch, generator=generator) * 2 - 1) * 0.1 if "scale" in transforms \
            else torch.ones(batch)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(batch)], 1),
                             torch.stack([sin, cos, torch.zeros(batch)], 1)], 1).to(x.dtype)
        grid = F.affine_grid(theta, (batch, c, h, w), align_corners=False)
        out = F.grid_sample(out, grid, padding_mode="border", align_corners=False)
    if "jitter" in transforms:
        shift = max(1, h // 8)
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        out = torch.roll(out, shifts=(dy, dx), dims=(2, 3))
    return out


def colour_matrix(images):
    """A colour decorrelation matrix (the square root of the channel covariance) from sample
    images [N, C, H, W], normalised to unit largest column norm."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1)
    cov = torch.cov(flat)
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    return root / root.norm(dim=0).max().clamp_min(1e-12)


def dream(model_a: nn.Module, model_b: nn.Module, *, difference: Union[str, Difference, Objective] = "elementwise",
          priors: Optional[Objective] = None, region: Optional[Region] = None,
          valid: Tuple[float, float] = (0.0, 1.0), shape: Optional[Sequence[int]] = None, param: str = "fft",
          transforms: Sequence[str] = TRANSFORMS, batch: int = 4, steps: int = 200, lr: float = 0.05,
          colour: Optional[torch.Tensor] = None, seed: int = 0, progress: bool = False) -> SearchResult:
    """A natural-looking input where model_a and model_b differ by `difference`.

    `priors`: an objective added to the mean difference over the transformed copies (e.g.
    `-0.05 * tv() - 0.01 * l2()`). The image lives in `region`'s bounding box (projected onto
    the region at the end) or, without a region, in the `valid` range. `param`: pixel, sigmoid or
    fft; `transforms`: any of jitter, scale, rotate; `colour`: a CxC decorrelation matrix (see
    `colour_matrix`). Returns a `SearchResult` whose `found` is the plain difference at the final
    image.
    """
    t0 = time.perf_counter()
    if param not in PARAMETERISATIONS:
        raise ArgumentError(f"unknown parameterisation '{param}'; use {', '.join(PARAMETERISATIONS)}")
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ArgumentError(f"unknown transforms {sorted(unknown)}; use {', '.join(TRANSFORMS)}")
    diff = objective_of(difference)
    pair = compose(model_a, model_b, region)
    shape = tuple(shape) if shape else image_shape(pair.input_shape)
    if region is None:
        region = Box(torch.full(shape, float(valid[0]), dtype=torch.float64),
                     torch.full(shape, float(valid[1]), dtype=torch.float64))
    region = region.reshape(shape)
    lo, hi = (t.float() for t in region.bounding_box())
    generator = torch.Generator().manual_seed(seed)
    image = _Image(shape, param, lo, hi, None if colour is None else torch.as_tensor(colour).float(), generator)
    objective, prior = as_objective(diff), (as_objective(priors) if priors is not None else None)
    pair32 = copy.deepcopy(pair).float()
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    trace, count = [], 0
    with progress_bar(progress, steps, desc="dream") as bar:
        try:
            for _ in range(steps):
                x = image()
                views = _transformed(x, transforms, batch, generator)
                value = objective(*pair32.outputs(views), views).mean()
                total = value + (prior(*pair32.outputs(x.unsqueeze(0)), x.unsqueeze(0)).mean() if prior else 0.0)
                opt.zero_grad()
                (-total).backward()
                opt.step()
                count += batch
                trace.append(value.item())
                bar.update(1)
        except KeyboardInterrupt:
            pass
    with torch.no_grad():
        final = image().double()
    notes = [f"DeepDream: {param} parameterisation, transforms {', '.join(transforms) or 'none'}"
             + (f", priors {prior.name}" if prior else "")]
    # the final image is scored on the models as they run (an fp16 model in fp16)
    return witness_result(pair, diff, region, final, count, seed, trace, time.perf_counter() - t0, notes)
