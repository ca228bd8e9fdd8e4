"""The models as they run: which arithmetic each one executes in, how to evaluate it that way,
its exact float64 stand-in for gradients, and its lowered chain for the bound methods.

`arithmetic` names what a certificate covers, per model:
  native  each model as loaded: an fp16 module in fp16, a torch.ao / torchao int8 module as torch
          runs it, a float64 NNet in fp64 (the default);
  exact   the stored weights in exact real arithmetic (what ReluDiff, NeuroDiff and VeryDiff
          certify; no rounding at all);
  fp64 / fp32 / fp16 / bf16   a float model cast to that format first (`model.half()` for fp16).
"""
import copy

import torch

from . import quantized  # noqa: F401  (registers the quantised modules' stages with lowering)
from .errors import DiffprobeError
from .execution import float_tensors, is_quantized

ARITHMETICS = ("native", "exact", "fp64", "fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda", "auto")
_CAST = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_arithmetic(name):
    if name not in ARITHMETICS:
        raise DiffprobeError(f"unknown arithmetic '{name}'; choose one of {', '.join(ARITHMETICS)}")
    return name


def resolve_device(device):
    """The torch.device the search runs the models on: 'cpu' (None), 'cuda' / 'cuda:N', or 'auto'
    (CUDA when torch sees a GPU, else the CPU)."""
    name = "cpu" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise DiffprobeError(f"unknown device '{name}'; choose one of {', '.join(DEVICES)}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DiffprobeError("device 'cuda' asked for, but torch sees no CUDA GPU on this machine; use device "
                             "'cpu' or 'auto'")
    if resolved.type not in ("cpu", "cuda"):
        raise DiffprobeError(f"device '{name}' is not supported; choose one of {', '.join(DEVICES)}")
    return resolved


def deployed(model, arithmetic):
    """The module as it runs under `arithmetic`: itself for 'native' and 'exact', a copy cast to the
    format for 'fp64'/'fp32'/'fp16'/'bf16'. Quantised modules keep their own arithmetic."""
    check_arithmetic(arithmetic)
    if arithmetic in ("native", "exact"):
        return model
    if is_quantized(model):
        raise DiffprobeError(f"a quantised model runs in its own int8 arithmetic; certify it with "
                             f"arithmetic 'native' (or 'exact'), not '{arithmetic}'")
    return copy.deepcopy(model).to(_CAST[arithmetic])


def describe(model, arithmetic):
    """What a certificate under `arithmetic` covers for this model: 'exact', a float format
    ('fp16', ...), or 'int8' plus the format of the float parts ('int8+fp32')."""
    from .arithmetic import format_of
    if arithmetic == "exact":
        return "exact"
    model = deployed(model, arithmetic)
    tensors = float_tensors(model)
    dtype = tensors[0].dtype if tensors else torch.float32
    return ("int8+" if is_quantized(model) else "") + format_of(dtype).name


class Deployment:
    """Two models as they run under the chosen arithmetic: `pair` evaluates the deployed modules,
    `surrogate` (float64, None when no float form exists) is what gradients go through, `chains`
    the lowered chains (None where a model cannot be lowered; `notes` say why), lowered on first use."""

    def __init__(self, models, names, pair, points, device=None):
        self.models, self.names, self.points = models, names, points
        self.device, self._on_device = resolve_device(device), {}
        self.exact = names[0] == "exact"
        self.arithmetic = {k: "exact" if self.exact else describe(m, "native")
                           for k, m in zip(("model_a", "model_b"), models)}
        self.notes, self._chains, self._surrogate = [], None, None
        self.pair = self.surrogate if self.exact else pair
        if self.pair is None:
            raise DiffprobeError("a quantised model without a lowered chain has no exact arithmetic to "
                                 f"evaluate ({'; '.join(self.notes)}); use arithmetic 'native'")

    @property
    def chains(self):
        from .lowering import Declined, lower
        if self._chains is None:
            chains = []
            for label, model in zip(("model_a", "model_b"), self.models):
                try:
                    chain = lower(model, self.points.shape[1:], exact=self.exact)
                    if not self.exact:
                        chain.check(model, self.points)
                    chains.append(chain)
                except Declined as why:
                    chains.append(None)
                    self.notes.append(f"{label} is not lowered to a chain: {why}")
            self._chains = tuple(chains)
        return self._chains

    @property
    def surrogate(self):
        from .graph import Pair
        if self._surrogate is None:
            models = [m if not is_quantized(m) else c for m, c in
                      zip(self.models, self.chains if any(map(is_quantized, self.models)) else (None, None))]
            # copied together, so modules the two models share stay shared (one traced node)
            surrogates = [_surrogate(m) for m in copy.deepcopy(models)]
            self._surrogate = False if None in surrogates else Pair(*surrogates, self.points.shape[1:]).eval()
        return self._surrogate or None

    @property
    def search_pair(self):
        """The pair the search evaluates, on `device` (torch.ao's int8 modules run on the CPU only, so
        a pair holding one stays there). Bounds are always computed on the CPU in float64."""
        return self._moved(self.pair)

    @property
    def search_surrogate(self):
        """The float64 stand-in the search takes gradients through, on `device`."""
        return self._moved(self.surrogate)

    def _moved(self, pair):
        if pair is None or self.device.type == "cpu" or any(map(is_quantized, (pair.model_a, pair.model_b))):
            return pair
        if id(pair) not in self._on_device:  # copied, so the CPU pair the bounds use stays where it is
            self._on_device[id(pair)] = copy.deepcopy(pair).to(self.device)
        return self._on_device[id(pair)]

    @property
    def native_bounds(self):
        """Whether the deployed arithmetic can be bounded: exact, or both models lowered."""
        return self.exact or all(c is not None for c in self.chains)


def deploy(model_a, model_b, regions, arithmetic="native", arithmetic_b=None, device=None):
    """The `Deployment` of two models under `arithmetic` (for model_b `arithmetic_b` when it
    differs) over `regions` (their centres check each lowered chain against its module); the
    search evaluates them on `device` (see `resolve_device`)."""
    from .graph import compose
    names = (check_arithmetic(arithmetic), check_arithmetic(arithmetic_b or arithmetic))
    if "exact" in names and names[0] != names[1]:
        raise DiffprobeError("arithmetic 'exact' applies to both models or neither")
    models = [deployed(m, a) for m, a in zip((model_a, model_b), names)]
    pair = compose(*models, regions[0])
    points = torch.stack([r.center.reshape(pair.input_shape) for r in regions[:4]]).double()
    return Deployment(models, names, pair, points, device)


def _surrogate(model):
    """The model's exact function in float64 with autograd, from a copy of a float model or the
    lowered chain of a quantised one (None without a chain)."""
    from .lowering import Chain
    if model is None:
        return None
    return model.module() if isinstance(model, Chain) else model.double()
