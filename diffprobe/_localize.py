"""`localize`: which layer makes two models differ? Per pair of matching layers, the sampled error of
its activations (SQNR, max |delta|, as PyTorch's numeric suite and ONNX Runtime's quantisation
debugger report) on the models as they run, and its certified contribution: the bound on the output
difference when only that layer's weights are model_b's (all others model_a's), and when all but
that layer's are.

The certified contributions swap stored weights (dequantised for int8, cast for fp16) into copies of
model_a and bound them in exact arithmetic: they isolate each layer's weights, not the rounding of
its deployed activations (the sampled columns include that).
"""
import copy
import math
import time
from pathlib import Path
from typing import Any, List, Optional, Union

import torch
from torch import nn

from .certification import certify
from .data import as_points
from .errors import DiffprobeError
from .execution import is_quantized, run_native
from .graph import common_input_shape
from .progress import progress_bar
from .quantized import dequantized
from .regions import Box, L2Ball, LinfBall, Region, ball
from .results import LayerDrift, LayerReport, provenance

SAMPLES = 512  # inputs for the sampled columns when a region is given


def localize(model_a: nn.Module, model_b: nn.Module, region_or_data: Union[Region, torch.Tensor, str, Path], *,
             eps: Optional[float] = None, norm: str = "inf", clip=None, regions: int = 4,
             difference: str = "elementwise", method: str = "auto", seed: int = 0,
             progress: bool = False) -> LayerReport:
    """Per matching layer (same name in both models, with weights): sampled SQNR (dB) and max
    |delta| of its output, and the certified bound of `difference` when only that layer differs
    (`only`) and when all but it do (`all_but`), over `region_or_data` — a region, or data points
    (with `eps`: balls around the first `regions` of them; the sampled columns use up to 512 points).
    Layers are ranked by `only`, then by sampled max |delta|."""
    t0 = time.perf_counter()
    names = matching_layers(model_a, model_b)
    if not names:
        raise DiffprobeError("the models share no layer with weights by name; localize compares layers "
                             "of the same architecture (a fine-tuned, pruned, fp16 or int8 copy)")
    inputs, balls = _inputs_and_regions(model_a, model_b, region_or_data, eps, norm, clip, regions, seed)
    sampled = _sampled_errors(model_a, model_b, names, inputs, balls[0])
    modules_b = dict(model_b.named_modules())
    weights = {name: stored_weights(modules_b[name]) for name in names}
    notes: List[str] = []
    bound = lambda hybrid: _worst_bound(model_a, hybrid, balls, difference, method, seed, notes)
    layers = []
    with progress_bar(progress, 2 * len(names) + 1, desc="localize") as bar:
        overall = bound(_with_weights(model_a, weights))
        bar.update(1)
        for name in names:
            only = bound(_with_weights(model_a, {name: weights[name]}))
            all_but = bound(_with_weights(model_a, {n: w for n, w in weights.items() if n != name}))
            bar.update(2)
            layers.append(LayerDrift(name=name, kind=type(modules_b[name]).__name__,
                                     **sampled[name], only=only, all_but=all_but))
    ranking = sorted(layers, key=lambda r: (-_finite(r.only), -_finite(r.max_abs)))
    return LayerReport(layers=layers, ranking=[r.name for r in ranking], bound=overall, difference=difference,
                       regions=len(balls), samples=len(inputs), seconds=time.perf_counter() - t0,
                       notes=list(dict.fromkeys(notes)), provenance=provenance(seed))


def _finite(v):
    return -math.inf if v is None or math.isnan(v) else v


def matching_layers(model_a: nn.Module, model_b: nn.Module) -> List[str]:
    """Names of the leaf modules with weights that both models have, of equal weight shape, in
    model_a's order."""
    modules_b = dict(model_b.named_modules())
    names = []
    for name, module in model_a.named_modules():
        if list(module.children()) or name not in modules_b or not _has_weight(module):
            continue
        other = modules_b[name]
        if _has_weight(other) and stored_weights(other)[0].shape == stored_weights(module)[0].shape:
            names.append(name)
    return names


def _has_weight(module):
    return getattr(module, "weight", None) is not None or hasattr(module, "_packed_params")


def stored_weights(module: nn.Module):
    """(weight, bias) of a layer as stored, in float64: dequantised for torch.ao int8 layers
    (static or dynamic) and torchao Int8Tensor weights, cast for fp16/bf16 ones."""
    weight, bias = (_stored(module, name) for name in ("weight", "bias"))
    if getattr(weight, "is_quantized", False):
        weight = dequantized(weight)
    elif type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize"):
        weight = weight.dequantize()
    as64 = lambda t: None if t is None else t.detach().to(torch.float64)
    return as64(weight), as64(bias)


def _stored(module, name):
    """A layer's parameter; torch.ao's int8 layers return theirs from a method of that name."""
    value: Any = getattr(module, name, None)
    return value() if callable(value) else value


def _with_weights(model, weights):
    """A copy of float `model` with the given layers' (weight, bias) swapped in, in its own dtype."""
    if is_quantized(model):
        raise DiffprobeError("localize swaps layers into model_a, which must be a float model; give the "
                             "float model as model_a and its quantised copy as model_b")
    hybrid = copy.deepcopy(model)
    modules = dict(hybrid.named_modules())
    with torch.no_grad():
        for name, (weight, bias) in weights.items():
            module = modules[name]
            module.weight.copy_(weight.to(module.weight.dtype).reshape(module.weight.shape))
            if bias is not None and getattr(module, "bias", None) is not None:
                module.bias.copy_(bias.to(module.bias.dtype))
    return hybrid


def _inputs_and_regions(model_a, model_b, region_or_data, eps, norm, clip, count, seed):
    if isinstance(region_or_data, (Box, LinfBall, L2Ball)):
        return region_or_data.sample(SAMPLES, torch.Generator().manual_seed(seed)), [region_or_data]
    points, _, _ = as_points(region_or_data, None)
    if isinstance(points, list):  # VNN-LIB boxes
        inputs = torch.cat([r.sample(SAMPLES // len(points) + 1, torch.Generator().manual_seed(seed))
                            for r in points])
        return inputs, points[:count]
    if eps is None:
        raise DiffprobeError("localize over data points needs eps (the radius of the balls it certifies)")
    shape = common_input_shape(model_a, model_b, [tuple(points.shape[1:])])
    points = points.to(torch.float64).reshape(len(points), *shape)
    return points[:SAMPLES], [ball(p, eps, norm, clip) for p in points[:count]]


def _sampled_errors(model_a, model_b, names, inputs, region):
    """Per layer, the models as they run: the error of model_b's layer on the input model_a's layer
    received (its own error: SQNR in dB, max |delta|, relative), and the SQNR of the whole models
    compared at its output (the error accumulated up to it) — PyTorch numeric suite's
    `compare_model_stub` and `compare_model_outputs`."""
    seen = {}
    shape = common_input_shape(model_a, model_b, [tuple(region.shape)])
    for which, model in (("a", model_a), ("b", model_b)):
        modules = dict(model.named_modules())
        hooks = [modules[n].register_forward_hook(_recorder(seen, which, n)) for n in names]
        try:
            with torch.no_grad():
                run_native(model, inputs.reshape(len(inputs), *shape))
        finally:
            for h in hooks:
                h.remove()
    modules_b = dict(model_b.named_modules())
    result = {}
    for n in names:
        (x_a, y_a), (_, y_b) = seen.get(("a", n), (None, None)), seen.get(("b", n), (None, None))
        own = _own_output(modules_b[n], x_a)
        result[n] = {**_errors(y_a, own), "accumulated_sqnr_db": _errors(y_a, y_b)["sqnr_db"]}
    return result


def _own_output(module, x):
    """The layer run as it runs on `x` (model_a's input to it), or None where it cannot take a
    float input (a static int8 layer expects its predecessor's quantised tensor)."""
    if x is None:
        return None
    try:
        with torch.no_grad():
            return run_native(module, x)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


def _errors(reference, other):
    if reference is None or other is None or reference.shape != other.shape:
        return {"sqnr_db": None, "max_abs": None, "relative": None}  # not observed (or reshaped)
    noise, signal = (other - reference).pow(2).sum().item(), reference.pow(2).sum().item()
    return {"sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
            "max_abs": (other - reference).abs().max().item(),
            "relative": math.sqrt(noise / signal) if signal > 0 else math.inf}


def _recorder(seen, which, name):
    """A forward hook keeping the layer's input and output (float64, quantised ones dequantised)."""
    as64 = lambda t: (t.dequantize() if getattr(t, "is_quantized", False) else t).detach().double()

    def hook(module, args, output):
        seen[(which, name)] = (as64(args[0]), as64(output))
    return hook


def _worst_bound(model_a, hybrid, regions, difference, method, seed, notes):
    """The largest certified bound over the regions (inf when a region cannot be bounded)."""
    worst = -math.inf
    for region in regions:
        # exact arithmetic: a hybrid is no deployed model, and rounding is no layer's contribution
        cert = certify(model_a, hybrid, region, difference=difference, method=method, seed=seed,
                       search_steps=5, search_restarts=1, arithmetic="exact")
        notes += cert.notes
        worst = max(worst, cert.bound)
    return worst
