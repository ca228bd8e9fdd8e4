"""Lowered stages of quantised modules: torch.ao (dynamic and static, eager and fx; QAT fake
quantisation) and torchao's int8 tensor subclasses, each as its stored integer weights (exact)
with the error of its activation quantisation and of its float arithmetic.

The int8 error model:
  - weights are exactly (q - zero_point) * scale, computed here in float64;
  - integer products are accumulated exactly (int32);
  - quantising an activation to a grid of step s moves it by at most s/2 inside the grid's range,
    and by its distance to the range outside it (clamping);
  - a dynamic scale comes from the min/max of the tensor being quantised; over a region it is at
    most what the layer's input bounds allow. torch.ao's dynamic scale is per batch tensor, so a
    certificate holds for batches whose rows all lie in the region (one input, or several from it);
  - the float parts (rescaling the accumulator, adding the bias, requantising) are a few roundings
    in fp32 (or the activation dtype, for torchao).
"""
import torch
from torch import nn

from .arithmetic import FORMATS, format_of
from .activations import RELU
from .lowering import OBSERVED, WEIGHT_TYPES, Declined, Stage, _cast, dense, register_stage

_FP32 = FORMATS[torch.float32]
_SAFETY = 1 + 2.0 ** -16  # a scale computed in fp32 may be a few ulps above its exact value


def _magnitude(lo, hi):
    return torch.maximum(lo.abs(), hi.abs())


def dequantized(q):
    """The exact values of a quantised weight tensor, in float64."""
    ints = q.int_repr().double()
    if q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return (ints - q.q_zero_point()) * q.q_scale()
    shape = [1] * q.dim()
    shape[q.q_per_channel_axis()] = -1
    return ((ints - q.q_per_channel_zero_points().double().reshape(shape))
            * q.q_per_channel_scales().double().reshape(shape))


def grid_error(scale, zero_point, qmin, qmax):
    """`Stage.output_error` of quantising values to the grid (q - zero_point) * scale, q in
    [qmin, qmax]: half a step inside the grid's range, the distance to the range beyond it."""
    low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale

    def error(x_lo, x_hi, y_lo, y_hi):
        over = torch.maximum((y_hi - high).clamp_min(0), (low - y_lo).clamp_min(0))
        return scale / 2 * _SAFETY + over + 2 * _FP32.rounding_error(_magnitude(y_lo, y_hi))
    return error


def _fp32_rescale_error(weight, bias, roundings):
    """Error of y = s * acc + b done in fp32 with `roundings` operations, acc exact."""
    absw = weight.abs()
    abs_bias = bias.abs()

    def error(x_lo, x_hi, y_lo, y_hi):
        abs_sum = _magnitude(x_lo, x_hi) @ absw.T + abs_bias
        return _FP32.gamma(roundings) * abs_sum + _FP32.rounding_error(_magnitude(y_lo, y_hi))
    return error


def _qrange(dtype):
    info = torch.iinfo({torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}[dtype])
    return info.min, info.max


# --- torch.ao dynamic quantisation ---------------------------------------------------------------

def _dynamic_input_error(levels):
    """Activations quantised per batch tensor to `levels` steps spanning [min(x, 0), max(x, 0)]:
    the step is at most (max(hi, 0) - min(lo, 0)) / levels over the box."""
    def error(lo, hi):
        span = hi.amax(1, keepdim=True).clamp_min(0) - lo.amin(1, keepdim=True).clamp_max(0)
        step = span / levels * _SAFETY
        return (step / 2 + 2 * _FP32.rounding_error(_magnitude(lo, hi))).expand_as(lo)
    return error


@register_stage(torch.ao.nn.quantized.dynamic.Linear)
def _dynamic_linear(module, ctx):
    if module._packed_params.dtype != torch.qint8:
        raise Declined(f"{ctx.name}: dynamic quantisation to {module._packed_params.dtype} is not modelled")
    weight, bias = module._packed_params._weight_bias()
    w = dequantized(weight)
    b = bias.detach().double() if bias is not None else torch.zeros(len(w), dtype=torch.float64)
    stages = _cast(ctx, torch.float32)
    ctx.dtype, ctx.shape, ctx.batch_independent = torch.float32, (len(w),), False
    if ctx.exact:
        return stages + [Stage(ctx.name, w, b, ctx.shape)]
    # x86/fbgemm quantise activations to 7 bits (reduce_range), qnnpack to 8: the coarser is assumed
    return stages + [Stage(ctx.name, w, b, ctx.shape, input_error=_dynamic_input_error(127),
                           output_error=_fp32_rescale_error(w, b, 4))]


# --- torch.ao static quantisation (eager or fx, converted) ---------------------------------------

@register_stage(torch.ao.nn.quantized.Quantize)
def _quantize(module, ctx):
    stages = _cast(ctx, torch.float32)
    scale, zero_point = float(module.scale), int(module.zero_point)
    ctx.dtype, ctx.scale = torch.float32, scale
    error = None if ctx.exact else grid_error(scale, zero_point, *_qrange(module.dtype))
    return stages + [Stage(ctx.name, None, None, ctx.shape, output_error=error)]


@register_stage(torch.ao.nn.quantized.DeQuantize)
def _dequantize(module, ctx):
    ctx.scale = None
    error = None if ctx.exact else (lambda x_lo, x_hi, y_lo, y_hi: _FP32.rounding_error(_magnitude(y_lo, y_hi)))
    return [Stage(ctx.name, None, None, ctx.shape, output_error=error)]


def _static_layer(module, ctx, conv):
    """A quantised Linear/Conv: exact integer weights, requantised to the module's own grid."""
    if ctx.scale is None:
        raise Declined(f"{ctx.name}: a quantised layer whose input is not a quantised tensor")
    weight = dequantized(module.weight())
    bias = module.bias()
    float_module = _float_twin(module, weight, bias, conv)
    w, b, shape = dense(float_module, ctx.shape)
    fused_relu = type(module).__name__.endswith("ReLU2d") or type(module).__name__.endswith("ReLU")
    grid = grid_error(float(module.scale), int(module.zero_point), *_qrange(torch.quint8))
    in_scale, w_scale = ctx.scale, _max_scale(module.weight())
    ctx.shape, ctx.scale = shape, float(module.scale)
    if ctx.exact:
        return [Stage(ctx.name, w, b, shape)] + ([RELU] if fused_relu else [])
    rescale = _fp32_rescale_error(w, b, 4)

    def accumulate(x_lo, x_hi, y_lo, y_hi):  # fp32 rescaling, the bias rounded to the accumulator's step
        return rescale(x_lo, x_hi, y_lo, y_hi) + in_scale * w_scale
    if fused_relu:  # relu before requantising
        return [Stage(ctx.name, w, b, shape, output_error=accumulate), RELU,
                Stage(ctx.name + " (requantise)", None, None, shape, output_error=grid)]
    return [Stage(ctx.name, w, b, shape, output_error=lambda *a: accumulate(*a) + grid(*a))]


def _max_scale(q):
    if q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return float(q.q_scale())
    return float(q.q_per_channel_scales().max())


def _float_twin(module, weight, bias, conv):
    """A float64 nn.Linear / nn.Conv2d with the quantised module's exact weights and geometry."""
    if not conv:
        twin = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    else:
        if module.padding_mode != "zeros":
            raise Declined(f"quantised convolution with padding mode {module.padding_mode}")
        twin = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, module.groups, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.copy_(weight)
        twin.bias.copy_(bias.double() if bias is not None else torch.zeros(weight.shape[0]))
    return twin


register_stage(torch.ao.nn.quantized.Linear, torch.ao.nn.intrinsic.quantized.LinearReLU)(
    lambda m, ctx: _static_layer(m, ctx, conv=False))
register_stage(torch.ao.nn.quantized.Conv2d, torch.ao.nn.intrinsic.quantized.ConvReLU2d)(
    lambda m, ctx: _static_layer(m, ctx, conv=True))


# --- QAT (fake quantisation, eager prepare_qat) ---------------------------------------------------

def _fake_quant_grid(fq, name):
    """The grid of a FakeQuantize / observer hook, which must be frozen (observer disabled)."""
    if not bool(getattr(fq, "fake_quant_enabled", torch.tensor([1]))[0]):
        return None
    if bool(getattr(fq, "observer_enabled", torch.tensor([0]))[0]):
        raise Declined(f"{name}: its fake quantisation still observes (its scale changes with every "
                       "input); call model.apply(torch.ao.quantization.disable_observer) first")
    if fq.scale.numel() != 1:
        raise Declined(f"{name}: per-channel activation fake quantisation is not modelled")
    return grid_error(float(fq.scale), int(fq.zero_point), int(fq.quant_min), int(fq.quant_max))


def _qat_layer(module, ctx):
    """A QAT Linear/Conv2d: weights fake-quantised as its forward does, output fake-quantised by
    its observer hook."""
    if bool(getattr(module.weight_fake_quant, "observer_enabled", torch.tensor([0]))[0]):
        raise Declined(f"{ctx.name}: its weight fake quantisation still observes; call "
                       "model.apply(torch.ao.quantization.disable_observer) first")
    with torch.no_grad():
        weight = module.weight_fake_quant(module.weight.detach()).double()
    twin = (nn.Linear(module.in_features, module.out_features, dtype=torch.float64)
            if isinstance(module, nn.Linear) else
            nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                      module.padding, module.dilation, module.groups, dtype=torch.float64))
    with torch.no_grad():
        twin.weight.copy_(weight)
        twin.bias.copy_(module.bias.detach().double() if module.bias is not None else torch.zeros(len(weight)))
    stages = _cast(ctx, torch.float32)
    w, b, shape = dense(twin, ctx.shape)
    ctx.shape, ctx.dtype = shape, torch.float32
    if ctx.exact:
        return stages + [Stage(ctx.name, w, b, shape)]
    fp32 = _fp32_rescale_error(w, b, 1)
    out = _observer_grid(module, ctx.name)
    error = fp32 if out is None else (lambda *a: fp32(*a) + out(*a))
    return stages + [Stage(ctx.name, w, b, shape, output_error=error)]


def _observer_grid(module, name):
    fq = getattr(module, "activation_post_process", None)
    return None if fq is None else _fake_quant_grid(fq, name)


@register_stage(torch.ao.quantization.QuantStub, torch.ao.quantization.DeQuantStub)
def _stub(module, ctx):
    grid = None if ctx.exact else _observer_grid(module, ctx.name)
    stages = _cast(ctx, torch.float32)
    ctx.dtype = torch.float32
    return stages + ([Stage(ctx.name, None, None, ctx.shape, output_error=grid)] if grid else [])


register_stage(torch.ao.nn.qat.Linear, torch.ao.nn.qat.Conv2d)(_qat_layer)
OBSERVED.update({torch.ao.nn.qat.Linear, torch.ao.nn.qat.Conv2d, torch.ao.quantization.QuantStub,
                 torch.ao.quantization.DeQuantStub})


# --- torchao int8 tensor subclasses in an nn.Linear ------------------------------------------------

def torchao_linear(module, ctx):
    """nn.Linear whose weight is torchao's Int8Tensor: weight-only, or with dynamic symmetric
    activation quantisation per row or per tensor."""
    w_t = module.weight
    dtype = w_t.dtype
    fmt = format_of(dtype)
    for attribute in ("act_pre_scale", "act_quant_scale", "zero_point"):
        value = getattr(w_t, attribute, None)
        if value is not None and not (attribute == "zero_point" and not bool(value.any())):
            raise Declined(f"{ctx.name}: torchao int8 weights with {attribute} are not modelled")
    if w_t.block_size[-1] == w_t.qdata.shape[-1]:  # per row or per tensor: integer weights times a scale
        scale = w_t.scale.double()
        w = w_t.qdata.double() * (scale.reshape(-1, 1) if scale.numel() == len(w_t.qdata) else scale.reshape(()))
    else:  # per group: torchao dequantises in the activation dtype first
        w = w_t.dequantize().double()
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(len(w), dtype=torch.float64)
    stages = _cast(ctx, dtype)
    ctx.dtype, ctx.shape = dtype, (len(w),)
    if ctx.exact:
        return stages + [Stage(ctx.name, w, b, ctx.shape)]
    kwargs = w_t.act_quant_kwargs
    absw, terms = w.abs(), (w != 0).sum(1).double()
    if kwargs is None:  # float activations times int8 weights, rescaled and biased in `dtype`
        def error(x_lo, x_hi, y_lo, y_hi):
            from .arithmetic import dot_error
            abs_sum = _magnitude(x_lo, x_hi) @ absw.T + b.abs()
            return dot_error(fmt, terms, abs_sum, _magnitude(y_lo, y_hi), extra_roundings=2)
        return stages + [Stage(ctx.name, w, b, ctx.shape, output_error=error)]
    granularity = type(kwargs.granularity).__name__
    if granularity not in ("PerRow", "PerTensor") or "SYMMETRIC" not in str(kwargs.mapping_type) or \
            getattr(kwargs, "reduce_range", False):
        raise Declined(f"{ctx.name}: torchao activation quantisation {granularity}/{kwargs.mapping_type} "
                       "is not modelled")
    if granularity == "PerTensor":
        ctx.batch_independent = False

    def input_error(lo, hi):  # symmetric: step = max|x| / 127.5 (at least fp32's eps)
        step = (_magnitude(lo, hi).amax(1, keepdim=True) / 127.5).clamp_min(torch.finfo(torch.float32).eps)
        return (step / 2 * _SAFETY + 2 * fmt.rounding_error(_magnitude(lo, hi))).expand_as(lo)

    def output_error(x_lo, x_hi, y_lo, y_hi):  # rescaled in fp32, then in `dtype` twice, then biased
        abs_sum = _magnitude(x_lo, x_hi) @ absw.T + b.abs()
        return (_FP32.gamma(2) + fmt.gamma(3)) * abs_sum + fmt.rounding_error(_magnitude(y_lo, y_hi))
    return stages + [Stage(ctx.name, w, b, ctx.shape, input_error=input_error, output_error=output_error)]


WEIGHT_TYPES[("torchao", "Int8Tensor")] = torchao_linear
