import pytest
import torch

from diffprobe import DiffprobeError
from diffprobe import lirpa_compat


def test_patches_are_in_place_and_settings_restored():
    before = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(before)
    dtype = torch.get_default_dtype()
    lirpa_compat.import_auto_lirpa()
    import torch.onnx.symbolic_helper as helper
    assert callable(helper._set_opset_version)
    assert hasattr(torch._C.Node, "__getitem__")
    with lirpa_compat.traced(torch.float64):
        assert torch.get_default_dtype() == torch.float64
    assert torch.get_default_dtype() == dtype
    after = torch._C._jit_set_profiling_executor(before)
    assert after == before


def test_import_keeps_the_callers_warning_filters():
    import subprocess
    import sys
    code = ("import warnings; from diffprobe.lirpa_compat import import_auto_lirpa; "
            "before = list(warnings.filters); import_auto_lirpa(); "
            "assert warnings.filters == before, 'filters changed'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "DeprecationWarning" not in run.stderr


def test_node_attribute_access_by_name():
    lirpa_compat.import_auto_lirpa()
    graph = torch.jit.trace(lambda x: torch.flatten(x, 1), torch.zeros(1, 2, 2)).graph
    node = graph.create("onnx::Flatten")
    node.i_("axis", 1)
    assert node["axis"] == 1


def test_unsupported_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "1.12.0")
    with pytest.raises(DiffprobeError, match="pip install 'torch>=2.4,<2.14'"):
        lirpa_compat.check_torch()


def test_alpha_crown_with_mostly_unstable_relus():
    """0.3 crashes in reconstruct_full_alpha when > 90 % of a ReLU layer is unstable."""
    from diffprobe import LinfBall, certify
    from conftest import mlp
    a, b = mlp([6, 40, 40, 2], 0), mlp([6, 40, 40, 2], 1)
    cert = certify(a, b, LinfBall(torch.zeros(6), 3.0), method="alpha-crown")
    assert cert.bound >= cert.found


def test_traced_is_safe_across_threads():
    import concurrent.futures
    from diffprobe.lirpa_compat import traced
    before = torch.get_default_dtype()

    def inside(_):
        with traced(torch.float64):
            seen = torch.get_default_dtype()
            torch.zeros(1000).sum()  # give the other threads a chance to interleave
            return seen

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert set(pool.map(inside, range(64))) == {torch.float64}
    assert torch.get_default_dtype() == before
