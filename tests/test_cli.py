import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from diffprobe.cli import main
from conftest import shared


def factory(shift=0.0):
    torch.manual_seed(0)  # the CLI builds the architecture; weights come from the file
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.fixture
def pair(tmp_path):
    a = factory()
    b = factory()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b[2].bias.add_(0.2)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    np.save(tmp_path / "center.npy", np.zeros((4, 3), dtype=np.float32))
    return tmp_path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_search_json_contract(pair):
    r = run("search", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", "--center",
            pair / "center.npy", "--index", 2, "--eps", 0.1, "--json", "--quiet", "--steps", 10,
            "--save-witness", pair / "w.npy")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("difference", "found", "x", "output_a", "output_b", "evaluations", "seed"):
        assert key in out
    assert out["found"] == pytest.approx(0.2, abs=1e-6) and len(out["x"]) == 3
    assert np.load(pair / "w.npy").shape == (3,)


@pytest.mark.parametrize("threshold, code, verdict", [(1.0, 0, "verified"), (0.1, 10, "falsified")])
def test_certify_exit_codes(pair, threshold, code, verdict):
    r = run("certify", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", "--box", -1, 1,
            "--method", "crown", "--threshold", threshold, "--json", "--quiet")
    assert r.exit_code == code, r.output
    out = json.loads(r.stdout)
    assert out["verdict"] == verdict and out["found"] == pytest.approx(0.2, abs=1e-6)
    assert out["found"] <= out["bound"]
    for key in ("difference", "method", "lower", "upper", "bound", "found", "gap_ratio", "verdict", "seconds", "seed"):
        assert key in out


def test_certify_unknown_exit_code_on_real_pair():
    a = shared("acasxu/ACASXU_run2a_1_1_batch_2000.nnet")
    b = shared("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet")
    r = run("compare", a, b, "--vnnlib", shared("acasxu/prop_1.vnnlib"), "--method", "crown",
            "--threshold", 0.01, "--quiet")
    assert r.exit_code == 5, r.output
    assert "unknown" in r.stdout and "bound" in r.stdout


WARNING_MODEL = """
import warnings
import torch
from torch import nn


class Warns(nn.Sequential):
    def forward(self, x):
        warnings.warn("this model warns")
        return super().forward(x)


def make():
    torch.manual_seed(0)
    return Warns(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
"""


def test_python_warnings_are_one_line_on_the_command_line(pair):
    import subprocess
    import sys
    (pair / "warns.py").write_text(WARNING_MODEL)
    r = subprocess.run([sys.executable, "-c", "from diffprobe.cli import main; main()", "search",
                        str(pair / "a.pt"), str(pair / "b.pt"), "--arch", f"{pair / 'warns.py'}:make",
                        "--box", "-1", "1", "--steps", "5", "--quiet", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "diffprobe: warning: this model warns" in r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr


def test_onnx_against_nnet_with_vnnlib(tmp_path):
    r = run("search", shared("acasxu/ACASXU_run2a_1_1_batch_2000.onnx"),
            shared("acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet"),
            "--vnnlib", shared("acasxu/prop_1.vnnlib"), "--steps", 5, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert 0 < json.loads(r.stdout)["found"] < 1e-3


@pytest.mark.parametrize("args, message", [
    (["--eps", "-0.1"], "-0.1 must be >= 0"),
    ([], "exactly one region"),
    (["--eps", "0.1", "--box", "0", "1"], "exactly one region"),
])
def test_usage_errors_are_one_line_and_exit_2(pair, args, message):
    region = ["--center", str(pair / "center.npy")] if args else []
    r = run("certify", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", *region, *args)
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_untrusted_pickle_and_shape_mismatch(pair):
    torch.save(factory(), pair / "whole.pt")
    r = run("search", pair / "whole.pt", pair / "whole.pt", "--box", 0, 1)
    assert r.exit_code == 1 and "--trust" in r.stderr
    other = nn.Sequential(nn.Linear(4, 2))
    torch.save(other, pair / "other.pt")
    r = run("search", pair / "whole.pt", pair / "other.pt", "--trust", "--box", 0, 1)
    assert r.exit_code == 1 and "input shapes differ" in r.stderr


def test_search_starts_from_data_and_refuses_data_of_another_shape(pair):
    common = ["search", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", "--box", -1, 1,
              "--steps", 5, "--quiet", "--json"]
    plain, r = run(*common), run(*common, "--data", pair / "center.npy")
    assert r.exit_code == 0, r.output
    # the 4 data points are ranked (and counted) before the search starts
    assert json.loads(r.stdout)["evaluations"] == json.loads(plain.stdout)["evaluations"] + 4
    np.save(pair / "wide.npy", np.zeros((4, 5), dtype=np.float32))
    r = run(*common, "--data", pair / "wide.npy")
    assert r.exit_code == 1 and "input shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_version_and_usage_error():
    assert run("--version").output.startswith("diffprobe, version")
    assert run("certify").exit_code == 2


def test_certify_over_data_json_exit_codes_and_resume(pair):
    np.savez(pair / "data.npz", x=np.random.default_rng(0).random((5, 3)), y=np.array([0, 1, 1, 0, 1]))
    base = ["certify", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", "--data", pair / "data.npz",
            "--eps", 0.05, "--json", "--quiet"]
    ok = run(*base, "--threshold", 0.3, "--out", pair / "r.json")
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["counts"] == {"verified": 5, "falsified": 0, "unknown": 0} and out["verdict"] == "verified"
    assert [p["index"] for p in out["points"]] == list(range(5))
    for key in ("bound", "found", "verdict"):
        assert key in out["points"][0]
    assert json.loads((pair / "r.json").read_text())["bound"] == out["bound"]
    assert len((pair / "r.jsonl").read_text().splitlines()) == 6
    again = run(*base, "--threshold", 0.3, "--out", pair / "r.json", "--resume")
    assert again.exit_code == 0 and json.loads(again.stdout)["points"] == out["points"]
    bad = run(*base, "--threshold", 0.1)
    assert bad.exit_code == 10 and json.loads(bad.stdout)["counts"]["falsified"] == 5
    top1 = run(*base, "--top1", "--jobs", 2)
    assert top1.exit_code in (0, 5, 10) and json.loads(top1.stdout)["difference"] == "top1"
    assert run(*base).exit_code == 2  # no threshold: a usage error
    assert "--resume needs --out" in run(*base, "--threshold", 1, "--resume").stderr


def test_report_renders_saved_results(pair):
    np.save(pair / "pts.npy", np.random.default_rng(0).random((4, 3)))
    files = []
    for eps in (0.05, 0.2):
        f = pair / f"d{eps}.json"
        r = run("certify", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", "--data",
                pair / "pts.npy", "--eps", eps, "--threshold", 0.3, "--quiet", "--out", f)
        assert r.exit_code == 0, r.output
        files.append(f)
    r = run("search", pair / "a.pt", pair / "b.pt", "--arch", f"{__file__}:factory", "--box", -1, 1, "--json", "--quiet")
    (pair / "s.json").write_text(r.stdout)
    files.append(pair / "s.json")
    import matplotlib
    import matplotlib.pyplot as plt
    backend, open_figures = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use("svg")  # a notebook's backend, say: the report must leave it as it is
    try:
        r = run("report", *files, "--out", pair / "report.html")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_figures
    finally:
        matplotlib.use(backend)
    assert r.exit_code == 0, r.output
    page = (pair / "report.html").read_text()
    assert "certified bound vs eps" in page and page.count("<img") >= 4 and "SearchResult" in page
    (pair / "junk.json").write_text("[1, 2]")
    r = run("report", pair / "junk.json", "--out", pair / "x.html")
    assert r.exit_code == 1 and "not a diffprobe result" in r.stderr


def test_demo_runs_and_answers_in_json():
    r = run("demo", "--json", "--quiet", "--eps", 0.01)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["eps"] == 0.01 and out["threshold"] == 3.0 and len(out["points"]) == 3
    for p in out["points"]:
        assert p["drift"]["found"] <= p["drift"]["bound"] and p["drift"]["verdict"] in ("verified", "falsified", "unknown")
