"""How a model runs: the dtype its input is cast to, whether its rows depend on each other
(activations quantised per batch), and evaluating it that way on float64 inputs."""
import torch

_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized",
                      "torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat", "torch.ao.quantization")


def is_quantized(model):
    """True when `model` holds quantised or fake-quantised modules, or quantised tensors (torchao)."""
    if any(type(m).__module__.startswith(_QUANTIZED_MODULES) for m in model.modules()):
        return True
    return any(_quantized_tensor(t) for t in list(model.parameters()) + list(model.buffers()))


def _quantized_tensor(t):
    return t.is_quantized or type(t) not in (torch.Tensor, torch.nn.Parameter)


def float_tensors(model):
    return [t for t in list(model.parameters()) + list(model.buffers())
            if t.is_floating_point() and not _quantized_tensor(t)]


def input_dtype(model):
    """The dtype a model's input is cast to when it runs: its first floating parameter's (fp16 for a
    `model.half()`); float32 for quantised and parameter-free models."""
    if is_quantized(model):
        return torch.float32
    tensors = float_tensors(model)
    return tensors[0].dtype if tensors else torch.float32


def batch_dependent(model):
    """True when one row's output depends on the other rows of the batch: activations quantised
    with one dynamic scale per batch tensor (torch.ao dynamic quantisation, torchao per-tensor)."""
    for m in model.modules():
        if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            return True
    for t in model.parameters():
        kwargs = getattr(t, "act_quant_kwargs", None)
        if kwargs is not None and type(getattr(kwargs, "granularity", None)).__name__ == "PerTensor":
            return True
    return False


def run_native(model, x):
    """`model` on float64 inputs as it runs: x cast to its input dtype, one row at a time when its
    rows depend on each other, the output in float64."""
    return run(model, x, input_dtype(model), batch_dependent(model))


def run(model, x, dtype, rowwise):
    """`run_native` with the dtype and batch dependence known (no cast node when none is needed, so
    a traced float64 graph stays minimal)."""
    x = x if x.dtype == dtype else x.to(dtype)
    y = torch.cat([model(row) for row in x.split(1)]) if rowwise and len(x) > 1 else model(x)
    return y if y.dtype == torch.float64 else y.double()
