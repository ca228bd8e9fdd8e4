"""`device=` / `--device`: the search evaluates the models where asked; bounds stay on the CPU in
float64. On a machine without CUDA, 'auto' is the CPU and 'cuda' is refused in one line; with a
GPU the CUDA tests compare against the CPU run."""

import pytest
import torch
from click.testing import CliRunner

import diffprobe as dp
from diffprobe.cli import main
from diffprobe.deployment import deploy, resolve_device
from diffprobe.errors import DiffprobeError
from conftest import mlp

CUDA = torch.cuda.is_available()


def _pair():
    a = mlp([4, 16, 16, 3], 0)
    b = mlp([4, 16, 16, 3], 0)
    with torch.no_grad():
        b[2].weight.mul_(1.05)
    return a, b, dp.LinfBall(torch.full((4,), 0.3, dtype=torch.float64), 0.2)


def test_auto_is_the_cpu_without_a_gpu_and_names_are_checked():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device(None).type == "cpu"
    with pytest.raises(DiffprobeError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    a, b, region = _pair()
    with pytest.raises(DiffprobeError, match="no CUDA GPU"):
        dp.search(a, b, region, device="cuda")
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    r = CliRunner().invoke(main, ["certify", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--trust",
                                  "--box", "0", "1", "--device", "cuda", "--quiet"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "--device cpu" in r.stderr


@pytest.mark.parametrize("device", ["cpu", "auto"] + (["cuda"] if CUDA else []))
def test_search_certify_and_drift_on_a_device(device):
    """The same witness value (up to the device's float64 arithmetic) and the same bound: the
    bound is computed on the CPU whatever the device."""
    a, b, region = _pair()
    here = dp.search(a, b, region, steps=20, restarts=2)
    there = dp.search(a, b, region, steps=20, restarts=2, device=device)
    assert there.found == pytest.approx(here.found, rel=1e-6)
    assert region.contains(there.witness().reshape(1, -1)).all()
    cert = dp.certify(a, b, region, search_steps=10, device=device)
    assert cert.bound == dp.certify(a, b, region, search_steps=10).bound and cert.found <= cert.bound
    points = torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = dp.drift(a, b, points, eps=0.05, threshold=1.0, search_steps=5, device=device)
    assert [p.bound for p in report.points] == [p.bound for p in dp.drift(a, b, points, eps=0.05, threshold=1.0,
                                                                          search_steps=5).points]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_search_pair_lives_on_the_gpu_and_the_bound_pair_on_the_cpu():
    a, b, region = _pair()
    deployment = deploy(a, b, [region], device="cuda")
    assert next(deployment.search_pair.parameters()).device.type == "cuda"
    assert next(deployment.pair.parameters()).device.type == "cpu"
