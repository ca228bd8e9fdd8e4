"""A zoo of checkpoints as users bring them, built in seconds on the digits data: each entry saves
a pair to a folder the way its tooling does and returns the command-line arguments that name it.

    from diffprobe_examples.zoo import ZOO
    args = ZOO["residual-cnn"](folder)   # ["a.pt", "b.pt", "--arch", "diffprobe_examples.zoo:residual_cnn"]
"""
import copy
import warnings

import numpy as np
import torch
from torch import nn

from diffprobe.layers import Network
from diffprobe_examples.deployed import dynamic_int8

HERE = "diffprobe_examples.zoo"


class ResidualCNN(nn.Module):
    """conv-BN-ReLU, a residual conv block, global average pooling, linear; 1x8x8 inputs."""

    input_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.block(h))
        return self.head(torch.flatten(self.pool(h), 1))


class Transformer(nn.Module):
    """One pre-norm transformer block over the 8 rows of an image (8 tokens of 8 features): attention
    written by hand or nn.MultiheadAttention, a GELU MLP, a linear classifier."""

    input_shape = (8, 8)

    def __init__(self, heads=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.heads = nn.MultiheadAttention(8, 2, batch_first=True) if heads else None
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.norm1(x)
        if self.heads is not None:
            x = x + self.heads(h, h, h, need_weights=False)[0]
        else:
            x = x + torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8 ** 0.5, dim=-1) @ self.v(h)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.flatten(1))


def residual_cnn():
    return ResidualCNN()


def transformer():
    return Transformer()


def attention_heads():
    return Transformer(heads=True)


def mlp():
    return Network([nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)], (64,))


def int8_mlp():
    return dynamic_int8(mlp())


def _trained(model, seed=0, epochs=8):
    from diffprobe_examples.demo import digits_data, train
    x, y, _, _ = digits_data(0)
    torch.manual_seed(seed)
    return train(model, x.reshape(-1, *model.input_shape), y, epochs=epochs)


def _tuned(model):
    """`model` fine-tuned briefly on the brighter digits 0-4 (the drift diffprobe measures)."""
    from diffprobe_examples.demo import digits_data, train
    x, y, _, _ = digits_data(0)
    keep = y < 5
    return train(copy.deepcopy(model), (x[keep] * 1.2).clamp(0, 1).reshape(-1, *model.input_shape), y[keep],
                 epochs=2, lr=1e-3, seed=1)


def _save_pair(folder, a, b, factory):
    torch.save(a.state_dict(), folder / "a.pt")
    torch.save(b.state_dict(), folder / "b.pt")
    return ["a.pt", "b.pt", "--arch", f"{HERE}:{factory}"]


def _data(folder, shape):
    from diffprobe_examples.demo import digits_data
    x_test = digits_data(0)[2][:6].reshape(-1, *shape)
    np.save(folder / "data.npy", x_test.numpy())
    np.save(folder / "center.npy", x_test[0].numpy())


def residual_cnn_pair(folder):
    torch.manual_seed(0)
    model = _trained(residual_cnn())
    _data(folder, model.input_shape)
    return _save_pair(folder, model, _tuned(model), "residual_cnn")


def transformer_pair(folder, factory="transformer"):
    torch.manual_seed(0)
    model = _trained(globals()[factory]())
    _data(folder, model.input_shape)
    return _save_pair(folder, model, _tuned(model), factory)


def pruned_pair(folder):
    """An MLP and its copy pruned by torch.nn.utils.prune without prune.remove: the state_dict holds
    weight_orig and weight_mask."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    model = _trained(mlp())
    pruned = copy.deepcopy(model)
    for layer in (pruned[0], pruned[2]):
        prune.l1_unstructured(layer, "weight", amount=0.3)
    _data(folder, (64,))
    return _save_pair(folder, model, pruned, "mlp")


def lora_pair(folder):
    """An MLP and a peft LoRA adapter of it (adapter folder, as save_pretrained writes it)."""
    import peft
    torch.manual_seed(0)
    model = _trained(mlp())
    torch.save(model.state_dict(), folder / "a.pt")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    tuned = peft.get_peft_model(copy.deepcopy(model), config)
    tuned.save_pretrained(folder / "adapter")
    _data(folder, (64,))
    return ["a.pt", "adapter", "--arch", f"{HERE}:mlp"]


def int8_pair(folder):
    """An MLP and its torch.ao dynamic int8 copy, saved as a state_dict of the quantised model."""
    torch.manual_seed(0)
    model = _trained(mlp())
    quantized = dynamic_int8(copy.deepcopy(model))
    torch.save(model.state_dict(), folder / "a.pt")
    torch.save(quantized.state_dict(), folder / "b.pt")
    _data(folder, (64,))
    return ["a.pt", "b.pt", "--arch", f"{HERE}:mlp", "--arch-b", f"{HERE}:int8_mlp"]


def onnx_pair(folder, build, dynamo):
    """A pair exported to ONNX by torch's TorchScript exporter (dynamic batch) or its dynamo one."""
    args = build(folder)
    from diffprobe.loading import load_model
    a = load_model(folder / args[0], arch=args[3])
    b = load_model(folder / args[1], arch=args[3])
    for name, model in (("a.onnx", a), ("b.onnx", b)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = {} if dynamo else {"dynamic_axes": {"x": {0: "batch"}}}
            torch.onnx.export(model, (torch.zeros(1, *model.input_shape),), str(folder / name), dynamo=dynamo,
                              input_names=["x"], **kwargs)
    return ["a.onnx", "b.onnx"]


ZOO = {
    "residual-cnn": residual_cnn_pair,
    "transformer": transformer_pair,
    "attention-heads": lambda folder: transformer_pair(folder, "attention_heads"),
    "pruned-reparametrised": pruned_pair,
    "lora-adapter": lora_pair,
    "int8-state-dict": int8_pair,
    "residual-cnn-onnx": lambda folder: onnx_pair(folder, residual_cnn_pair, False),
    "residual-cnn-onnx-dynamo": lambda folder: onnx_pair(folder, residual_cnn_pair, True),
    "transformer-onnx": lambda folder: onnx_pair(folder, transformer_pair, False),
    "transformer-onnx-dynamo": lambda folder: onnx_pair(folder, transformer_pair, True),
}
