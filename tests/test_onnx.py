"""ONNX models as torch's two exporters write them: residual and attention graphs, dynamic batch,
gzipped files; each import is checked against ONNX's own reference evaluator."""
import gzip
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import diffprobe as dp

onnx = pytest.importorskip("onnx")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.pool, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(h + self.c2(h))
        return self.fc(torch.flatten(self.pool(h), 1))


class Attention(nn.Module):
    """A transformer block written by hand (batch first), ending in Softmax."""

    def __init__(self):
        super().__init__()
        self.ln, self.q, self.k, self.v = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.ff, self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), nn.Linear(64, 3)

    def forward(self, x):
        h = self.ln(x)
        h = x + torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8 ** 0.5, dim=-1) @ self.v(h)
        return torch.softmax(self.head((h + self.ff(h)).flatten(1)), dim=-1)


class Branches(nn.Module):
    """Two branches joined by concatenation, LeakyReLU and Tanh."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 4), nn.Linear(6, 5), nn.Linear(9, 2)

    def forward(self, x):
        return self.out(torch.cat([nn.functional.leaky_relu(self.a(x), 0.1), torch.tanh(self.b(x))], dim=1))


MODELS = {"residual": (Residual, (1, 8, 8)), "attention": (Attention, (8, 8)), "branches": (Branches, (6,))}


def _export(model, shape, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {} if dynamo else {"dynamic_axes": {"x": {0: "batch"}}}  # the TorchScript one: dynamic batch
        torch.onnx.export(model, (torch.zeros(1, *shape),), str(path), dynamo=dynamo, input_names=["x"], **kwargs)


def _exporters():
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        return [False, True]
    except ImportError:
        return [False]


@pytest.mark.parametrize("dynamo", _exporters(), ids=lambda d: "dynamo" if d else "torchscript")
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_graphs_import_and_match_the_reference(tmp_path, name, dynamo):
    from onnx.reference import ReferenceEvaluator
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    model = cls().eval()
    path = tmp_path / "m.onnx"
    _export(model, shape, path, dynamo)
    imported = dp.load_model(path)
    x = torch.rand(3, *shape)
    reference = np.concatenate([ReferenceEvaluator(str(path)).run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(3)])
    assert np.abs(imported(x).detach().numpy() - reference).max() < 1e-5
    region = dp.LinfBall(x[0].double(), 0.02)
    found = dp.search(model, imported, region, steps=10, restarts=2).found
    assert found < 1e-4  # the same function (up to float32 rounding)
    cert = dp.certify(model, imported, region, search_steps=5)
    assert cert.found <= cert.bound and (cert.bound < float("inf") or cert.notes)


def test_gzipped_onnx_and_batch_moving_transposes(tmp_path):
    torch.manual_seed(0)
    model = Residual().eval()
    _export(model, (1, 8, 8), tmp_path / "m.onnx", False)
    (tmp_path / "m.onnx.gz").write_bytes(gzip.compress((tmp_path / "m.onnx").read_bytes()))
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(dp.load_model(tmp_path / "m.onnx.gz")(x), model(x), atol=1e-5)

    class Heads(nn.Module):  # nn.MultiheadAttention exports sequence-first: the batch moves
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0].flatten(1)

    _export(Heads().eval(), (4, 8), tmp_path / "heads.onnx", False)
    with pytest.raises(dp.UnsupportedOperationError, match="moves the batch dimension"):
        dp.load_model(tmp_path / "heads.onnx")


def test_zero_padding_exports_import(tmp_path):
    from onnx.reference import ReferenceEvaluator
    torch.manual_seed(0)
    model = nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten()).eval()
    _export(model, (1, 6, 6), tmp_path / "pad.onnx", False)
    x = torch.rand(2, 1, 6, 6)
    reference = np.concatenate([ReferenceEvaluator(str(tmp_path / "pad.onnx")).run(None, {"x": x[i:i + 1].numpy()})[0]
                                for i in range(2)])
    assert np.abs(dp.load_model(tmp_path / "pad.onnx")(x).detach().numpy() - reference).max() < 1e-6
