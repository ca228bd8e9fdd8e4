"""Test helpers: models saved the way users ship them (fp16, bf16, torch.ao int8 dynamic and
static, torchao int8), and the largest difference the deployed models reach in a region by
sampling plus a PGD of the tests' own (gradients of the exact float64 models, values of the
deployed ones)."""
import copy
import functools
import warnings

import torch
from torch import nn

from diffprobe.deployment import deploy
from diffprobe.layers import Network

KINDS = ["fp16", "bf16", "int8-dynamic", "int8-static"]


def torchao_available():
    try:
        import torchao  # noqa: F401
        return True
    except Exception:
        return False


def deployed_copy(model, kind, calibration=None):
    """`model` as deployed in `kind`; `calibration` inputs for static quantisation."""
    model = copy.deepcopy(model).eval()
    if kind == "fp16":
        return model.half()
    if kind == "bf16":
        return model.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        if kind == "int8-dynamic":
            return dynamic_int8(model)
        if kind == "int8-static":
            import torch.ao.quantization as tq
            wrapped = nn.Sequential(tq.QuantStub(), *model, tq.DeQuantStub()).eval()
            wrapped.qconfig = tq.get_default_qconfig("x86")
            prepared = tq.prepare(wrapped)
            prepared(calibration)
            return tq.convert(prepared)
        if kind.startswith("torchao"):
            from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                              quantize_)
            quantize_(model, Int8WeightOnlyConfig() if kind == "torchao-weight" else
                      Int8DynamicActivationInt8WeightConfig())
            return model
    raise ValueError(kind)


def native_max(model_a, model_b, region, difference, n=1000, steps=40, restarts=6, seed=0):
    """The largest `difference` between the deployed models found by n samples and a PGD."""
    deployment = deploy(model_a, model_b, [region])
    pair, surrogate = deployment.pair, deployment.surrogate
    gen = torch.Generator().manual_seed(seed)
    x = region.sample(n, gen).reshape(n, *pair.input_shape)
    with torch.no_grad():
        values = torch.nan_to_num(difference(*pair.outputs(x)), nan=float("inf"))
    best = values.max().item()
    if surrogate is None:
        return best
    lo, hi = region.bounding_box()
    step = (hi - lo).reshape(1, *pair.input_shape) / 8
    x = x[values.argsort(descending=True)[:restarts]].clone()
    for _ in range(steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(difference(*surrogate.outputs(x)).sum(), x)
        x = region.project((x + step * grad.sign()).detach().reshape(-1, *region.shape)).reshape(x.shape)
        with torch.no_grad():
            best = max(best, torch.nan_to_num(difference(*pair.outputs(x)), nan=float("inf")).max().item())
        step = step * 0.9
    return best


@functools.lru_cache(maxsize=None)
def digits_classifier():
    """The issue's 64-64-32-10 ReLU MLP on sklearn's digits, trained in about a second; with its
    test inputs."""
    from diffprobe_examples.demo import digits_data, train
    x, y, x_test, _ = digits_data(0)
    torch.manual_seed(0)
    return train(digits_architecture(), x, y, epochs=20), x_test


def digits_architecture():
    """The digits MLP's architecture (the CLI's --arch), untrained."""
    return Network([nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)], (64,))


def digits_int8_architecture():
    """The same, dynamically quantised: what a torch.ao int8 state_dict loads into."""
    return dynamic_int8(digits_architecture())


def dynamic_int8(model):
    """`model` with its Linear layers dynamically quantised to int8 by torch.ao (its deprecation
    notices silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def small_cnn(seed):
    """conv-ReLU-avgpool-flatten-linear on 1x8x8 inputs with seeded weights."""
    gen = torch.Generator().manual_seed(seed)
    net = Network([nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(27, 4)], (1, 8, 8))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


@functools.lru_cache(maxsize=None)
def digits_cnn():
    """A small CNN on the 1x8x8 digits images (conv-ReLU-avgpool twice, then linear), trained in
    a few seconds; with its test inputs."""
    from diffprobe_examples.demo import digits_data, train
    x, y, x_test, _ = digits_data(0)
    torch.manual_seed(0)
    model = Network([nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                     nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)], (1, 8, 8))
    return train(model, x.reshape(-1, 1, 8, 8), y, epochs=20), x_test.reshape(-1, 1, 8, 8)
