import numpy as np
import pytest
import torch
from torch import nn

from diffprobe import CheckpointError, UnsafeCheckpointError, UnsupportedOperationError, load_model
from diffprobe.loading import sniff_format
from conftest import shared


def factory(hidden=8):
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


ARCH = f"{__file__}:factory"


@pytest.mark.parametrize("rel, fmt, shape", [
    ("acasxu/ACASXU_run2a_1_1_batch_2000.onnx", "onnx", (1, 1, 5)),
    ("acasxu/ACASXU_run2a_1_1_batch_2000.nnet", "nnet", (5,)),
    ("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet", "nnet", (5,)),
    ("mnist_3x100/mnist_relu_3_100.nnet", "nnet", (784,)),
    ("mnistfc/mnist-net_256x2.onnx", "onnx", (784, 1)),
    ("mnistfc/mnist-net_256x4.onnx", "onnx", (784, 1)),
    ("har/HAR-trunc.onnx", "onnx", (561,)),
    ("har/HAR-trunc-mirror.onnx", "onnx", (561,)),
    ("toy/b2layer_unquantized.nnet", "nnet", (2,)),
])
def test_shared_networks_load_and_match_the_onnx_reference(rel, fmt, shape):
    path = shared(rel)
    assert sniff_format(path) == fmt
    model = load_model(path)
    assert model.input_shape == shape
    assert next(model.parameters()).dtype == (torch.float64 if fmt == "nnet" else torch.float32)  # as stored
    x = torch.rand(3, *shape, dtype=next(model.parameters()).dtype)
    out = model(x)
    assert torch.isfinite(out).all()
    if fmt == "onnx":
        import onnx
        from onnx.reference import ReferenceEvaluator
        graph = onnx.load(str(path)).graph
        inits = {i.name for i in graph.initializer}
        name = [i.name for i in graph.input if i.name not in inits][0]
        for row in range(3):
            sample = x[row].reshape(*([1] if len(shape) > 1 else []), *shape).numpy()
            ref = ReferenceEvaluator(str(path)).run(None, {name: sample})[0]
            np.testing.assert_allclose(out[row].detach().numpy().reshape(-1), ref.reshape(-1), atol=1e-5)


def test_acas_onnx_and_nnet_agree():
    onnx_model = load_model(shared("acasxu/ACASXU_run2a_1_1_batch_2000.onnx"))
    nnet_model = load_model(shared("acasxu/ACASXU_run2a_1_1_batch_2000.nnet"))
    x = torch.rand(500, 5, generator=torch.Generator().manual_seed(0)) - 0.5
    diff = (onnx_model(x.reshape(500, 1, 1, 5)) - nnet_model(x.double())).abs().max()
    assert diff < 1e-5


def test_toy_nnet_weights_and_normalisation():
    path = shared("toy/b2layer_unquantized.nnet")
    model = load_model(path)  # decimal text: read into float64, exactly as written
    assert torch.equal(model[0].weight, torch.tensor([[1.9, -2.1], [1.1, 1.0]], dtype=torch.float64))
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    h = torch.relu(model[0].weight @ x[0])
    h = torch.relu(torch.tensor([[2.1, -1.0], [-0.9, 1.1]], dtype=torch.float64) @ h)
    assert torch.allclose(model(x)[0], torch.tensor([[1.0, -1.0]], dtype=torch.float64) @ h)
    raw = load_model(path, normalize=True)  # inputs: mean 5, range 10; outputs: mean 0, range 0 (none)
    assert torch.allclose(raw(x * 10 + 5), model(x), atol=1e-5)
    acas, acas_raw = (load_model(shared("acasxu/ACASXU_run2a_1_1_batch_2000.nnet"), normalize=n) for n in (False, True))
    mean = torch.tensor([19791.091, 0.0, 0.0, 650.0, 600.0], dtype=torch.float64)
    rng = torch.tensor([60261.0, 6.28318530718, 6.28318530718, 1100.0, 1200.0], dtype=torch.float64)
    z = torch.rand(4, 5, dtype=torch.float64) - 0.5
    assert torch.allclose(acas_raw(z * rng + mean), acas(z) * 373.94992 + 7.5188840201005975, rtol=1e-4, atol=1e-3)


def test_state_dict_with_arch_and_lightning_prefix(tmp_path):
    model = factory()
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    loaded = load_model(path, arch=ARCH)
    x = torch.rand(5, 4)
    assert torch.equal(loaded(x), model(x))


def test_safetensors_and_arch_kwargs(tmp_path):
    from safetensors.torch import save_file
    model = factory(hidden=5)
    path = tmp_path / "w.bin"  # the extension is irrelevant: content decides
    save_file(model.state_dict(), str(path))
    assert sniff_format(path) == "safetensors"
    loaded = load_model(path, arch=ARCH, arch_kwargs='{"hidden": 5}')
    assert torch.equal(loaded(torch.ones(1, 4)), model(torch.ones(1, 4)))


def test_state_dict_without_arch_says_how(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(factory().state_dict(), path)
    with pytest.raises(CheckpointError, match="arch="):
        load_model(path)


def test_pickled_module_refused_without_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(factory(), path)
    with pytest.raises(UnsafeCheckpointError, match="trust=True"):
        load_model(path)
    assert isinstance(load_model(path, trust=True), nn.Module)


def test_pt2_refused_without_trust(tmp_path):
    model = factory()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, 4),)), str(path))
    assert sniff_format(path) == "pt2"
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert torch.allclose(loaded(torch.ones(1, 4)), model(torch.ones(1, 4)))


def test_nan_weights_and_garbage_are_refused(tmp_path):
    model = factory()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(path, arch=ARCH)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x17hello world")
    with pytest.raises(CheckpointError, match="unknown model format"):
        load_model(junk)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "missing.onnx")


def test_onnx_unsupported_ops_are_listed_together(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Softplus", ["x"], ["h"]), helper.make_node("Cos", ["x"], ["g"]),
             helper.make_node("Add", ["h", "g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UnsupportedOperationError, match="Cos, Softplus"):
        load_model(path)


def test_onnx_conv_pool_batchnorm_chain_matches_reference(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, (torch.rand(1, 1, 8, 8),), str(path), dynamo=False)
    model = load_model(path)
    x = torch.rand(1, 1, 8, 8)
    ref = ReferenceEvaluator(str(path)).run(None, {onnx.load(str(path)).graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(model(x).detach().numpy(), ref, atol=1e-5)


def test_pruning_reparametrisations_are_applied(tmp_path):
    import torch.nn.utils.prune as prune
    model = factory()
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # weight_orig and weight_mask in the state_dict
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    loaded = load_model(tmp_path / "pruned.pt", arch=ARCH)
    x = torch.rand(6, 4)
    assert torch.equal(loaded(x), model(x)) and int((loaded[0].weight == 0).sum()) == 16


def _lora_model():
    peft = pytest.importorskip("peft")
    base = factory()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    return base, peft.get_peft_model(factory(), config)


def test_peft_adapters_and_unmerged_state_dicts_are_merged(tmp_path):
    import json
    from click.testing import CliRunner
    from diffprobe.cli import main
    base, tuned = _lora_model()
    base.load_state_dict({k.replace("base_model.model.", "").replace("base_layer.", ""): v
                          for k, v in tuned.state_dict().items() if "lora_" not in k})
    torch.save(base.state_dict(), tmp_path / "base.pt")
    tuned.save_pretrained(tmp_path / "adapter")
    x = torch.rand(5, 4)
    with torch.no_grad():
        expected = tuned(x)
    from diffprobe.loading import load_model
    merged = load_model(tmp_path / "adapter", base=load_model(tmp_path / "base.pt", arch=ARCH))
    assert torch.allclose(merged(x), expected, atol=1e-6)
    (tmp_path / "full").mkdir()
    torch.save(tuned.state_dict(), tmp_path / "full" / "model.pt")  # unmerged: base_layer and lora keys
    (tmp_path / "full" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert torch.allclose(load_model(tmp_path / "full" / "model.pt", arch=ARCH)(x), expected, atol=1e-6)
    torch.save(tuned.state_dict(), tmp_path / "alone.pt")  # no configuration beside it: no scaling
    with pytest.raises(CheckpointError, match="scaling"):
        load_model(tmp_path / "alone.pt", arch=ARCH)
    r = CliRunner().invoke(main, ["certify", str(tmp_path / "base.pt"), str(tmp_path / "adapter"), "--arch", ARCH,
                                  "--box", "0", "1", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bound"] >= json.loads(r.stdout)["found"] > 0
