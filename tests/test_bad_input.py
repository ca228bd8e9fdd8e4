"""Careless and hostile input on the command line: every probe gets the documented exit code
(usage 2, everything else 1), exactly one line on stderr, no traceback, and no file outside
--out (and its .jsonl record) changes. Each probe is a real subprocess."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ARCH = '''import torch
from torch import nn


def net(hidden=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def not_a_module():
    return 5
'''


def _onnx(path, weight_dims=(2, 3), input_dims=(1, 3), with_data=True):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    if with_data:
        weight = helper.make_tensor("w", TensorProto.FLOAT, list(weight_dims), [0.5] * int(np.prod(weight_dims)))
    else:  # declared dimensions, no values: what a hostile file can claim
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(weight_dims))
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    onnx.save(helper.make_model(graph), str(path))


def _vnnlib(path, lines):
    declare = "\n".join(f"(declare-const X_{i} Real)" for i in range(3))
    path.write_text(declare + "\n(declare-const Y_0 Real)\n" + "\n".join(lines) + "\n")


@pytest.fixture
def files(tmp_path):
    """Every input a probe needs, written fresh for each probe."""
    torch.manual_seed(0)
    (tmp_path / "arch.py").write_text(ARCH)
    (tmp_path / "syntax.py").write_text("def net(:\n")
    a = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    torch.save(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).state_dict(), tmp_path / "wide.pt")
    torch.save(a, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:300])
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(2048))  # seeded: the same bytes every run
    np.save(tmp_path / "center.npy", np.full((4, 3), 0.5, dtype=np.float32))
    np.save(tmp_path / "data.npy", np.random.default_rng(0).random((5, 3)).astype(np.float32))
    np.save(tmp_path / "labels_short.npy", np.zeros(4, dtype=np.int64))
    np.save(tmp_path / "nan.npy", np.array([0.5, np.nan, 0.5], dtype=np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _vnnlib(tmp_path / "good.vnnlib", [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))" for i in range(3)])
    _vnnlib(tmp_path / "far.vnnlib", ["(assert (>= X_999999999 0.0))"])
    _vnnlib(tmp_path / "negative.vnnlib", ["(assert (>= X_-1 0.0))"])
    _vnnlib(tmp_path / "words.vnnlib", ["(assert (>= X_0 abc))"])
    with open(tmp_path / "huge.vnnlib", "wb") as handle:  # sparse: 65 MB declared, nothing written
        handle.truncate(65 << 20)
    _onnx(tmp_path / "nodata.onnx", weight_dims=(1_000_000_000, 1_000_000_000), with_data=False)
    _onnx(tmp_path / "bigin.onnx", input_dims=(1, 1_000_000_000_000))
    (tmp_path / "unrelated.json").write_text("my notes\n")
    (tmp_path / "run.jsonl").write_text("my own log\n")
    (tmp_path / "notes.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "s.members").mkdir()
    (tmp_path / "s.members" / "mine.txt").write_text("keep me\n")
    (tmp_path / "t.members").write_text("a file\n")
    (tmp_path / "target.txt").write_text("do not overwrite\n")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.txt")
    (tmp_path / "u.members").symlink_to(tmp_path / "s.members")
    (tmp_path / "blocked").write_text("a file, not a folder\n")
    return tmp_path


def _snapshot(folder):
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            out[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                out[str(path)] = hashlib.sha256(handle.read(1 << 20)).hexdigest() + str(path.stat().st_size)
        else:
            out[str(path)] = "dir"
    return out


M = ["a.pt", "b.pt", "--arch", "arch.py:net"]
R = ["--center", "center.npy", "--eps", "0.1"]
D = ["--data", "data.npy", "--eps", "0.1"]

PROBES = [
    # outputs: links, inputs, unrelated files, missing or unwritable folders
    ("out-symlink", ["certify", *M, *R, "--out", "link.json"], 1, "symbolic link"),
    ("out-is-data", ["certify", *M, *D, "--threshold", "1", "--out", "data.npy"], 1, "also an input"),
    ("out-is-model", ["certify", *M, *R, "--out", "a.pt"], 1, "also an input"),
    ("out-is-arch", ["certify", *M, *R, "--out", "arch.py"], 1, "also an input"),
    ("out-unrelated", ["certify", *M, *R, "--out", "unrelated.json"], 1, "not written by diffprobe"),
    ("out-unrelated-record", ["certify", *M, *D, "--threshold", "1", "--out", "run.json"], 1, "not written by diffprobe"),
    ("out-missing-folder", ["certify", *M, *R, "--out", "nowhere/r.json"], 1, "does not exist"),
    ("out-folder-is-file", ["certify", *M, *R, "--out", "blocked/r.json"], 1, "does not exist"),
    ("out-unwritable", ["certify", *M, *R, "--out", "/proc/r.json"], 1, "not writable"),
    ("witness-symlink", ["search", *M, *R, "--save-witness", "link.json"], 1, "symbolic link"),
    ("report-out-is-input", ["report", "notes.json", "--out", "notes.json"], 1, "also an input"),
    ("report-not-a-result", ["report", "notes.json", "--out", "r.html"], 1, "not a diffprobe result"),
    ("stability-foreign-members", ["stability", "--out", "s.json", "--members", "2", "--axes", "seed"], 1,
     "not made by diffprobe"),
    ("stability-members-file", ["stability", "--out", "t.json", "--members", "2", "--axes", "seed"], 1,
     "not a folder diffprobe made"),
    ("stability-members-link", ["stability", "--out", "u.json", "--members", "2", "--axes", "seed"], 1,
     "not a folder diffprobe made"),
    # models and architectures
    ("truncated-model", ["search", "truncated.pt", "b.pt", "--arch", "arch.py:net", "--box", "0", "1"], 1, "truncated.pt"),
    ("random-bytes-model", ["search", "random.bin", "b.pt", "--box", "0", "1"], 1, "unknown model format"),
    ("missing-model", ["search", "gone.pt", "b.pt", "--box", "0", "1"], 1, "cannot read"),
    ("model-is-folder", ["search", "s.members", "b.pt", "--box", "0", "1"], 1, "not a model file"),
    ("pickle-without-trust", ["search", "whole.pt", "whole.pt", "--box", "0", "1"], 1, "--trust"),
    ("weights-without-arch", ["search", "a.pt", "b.pt", "--box", "0", "1"], 1, "--arch"),
    ("arch-kwargs-not-json", ["search", *M, "--arch-kwargs", "{hidden:", "--box", "0", "1"], 1, "not valid JSON"),
    ("arch-kwargs-unknown", ["search", *M, "--arch-kwargs", '{"width": 3}', "--box", "0", "1"], 1, "failed with these arguments"),
    ("arch-kwargs-list", ["search", *M, "--arch-kwargs", "[1, 2]", "--box", "0", "1"], 1, "JSON object"),
    ("arch-syntax-error", ["search", "a.pt", "b.pt", "--arch", "syntax.py:net", "--box", "0", "1"], 1, "line 1"),
    ("arch-empty-module", ["search", "a.pt", "b.pt", "--arch", ":net", "--box", "0", "1"], 1, "must look like"),
    ("arch-missing-name", ["search", "a.pt", "b.pt", "--arch", "arch.py:gone", "--box", "0", "1"], 1, "cannot find"),
    ("arch-not-a-module", ["search", "a.pt", "b.pt", "--arch", "arch.py:not_a_module", "--box", "0", "1"], 1, "not an nn.Module"),
    ("state-dict-misfit", ["search", "wide.pt", "b.pt", "--arch", "arch.py:net", "--box", "0", "1"], 1, "does not fit"),
    ("onnx-initializer-without-data", ["search", "nodata.onnx", "nodata.onnx", "--box", "0", "1"], 1, "values"),
    ("onnx-huge-input", ["search", "bigin.onnx", "bigin.onnx", "--box", "0", "1"], 1, "values"),
    # regions
    ("no-region", ["certify", *M], 2, "exactly one region"),
    ("two-regions", ["certify", *M, *R, "--box", "0", "1"], 2, "exactly one region"),
    ("center-without-eps", ["certify", *M, "--center", "center.npy"], 2, "--eps"),
    ("negative-eps", ["certify", *M, "--center", "center.npy", "--eps", "-1"], 2, "must be >= 0"),
    ("nan-eps", ["certify", *M, "--center", "center.npy", "--eps", "nan"], 2, "finite"),
    ("infinite-box", ["certify", *M, "--box", "-inf", "inf"], 2, "finite"),
    ("reversed-box", ["certify", *M, "--box", "1", "0"], 2, "LO <= HI"),
    ("nan-center", ["certify", *M, "--center", "nan.npy", "--eps", "0.1"], 1, "NaN"),
    ("empty-center", ["certify", *M, "--center", "empty.npy", "--eps", "0.1"], 1, "empty"),
    ("pickled-center", ["certify", *M, "--center", "objects.npy", "--eps", "0.1"], 1, "objects.npy"),
    ("index-out-of-range", ["certify", *M, *R, "--index", "9"], 1, "out of range"),
    ("center-outside-clip", ["certify", *M, *R, "--clip", "0.6", "1"], 1, "--clip"),
    ("vnnlib-far-index", ["certify", *M, "--vnnlib", "far.vnnlib"], 1, "X_999999999"),
    ("vnnlib-negative-index", ["certify", *M, "--vnnlib", "negative.vnnlib"], 1, "X_-1"),
    ("vnnlib-non-numeric", ["certify", *M, "--vnnlib", "words.vnnlib"], 1, "not a number"),
    ("vnnlib-too-large", ["certify", *M, "--vnnlib", "huge.vnnlib"], 1, "MB"),
    # options
    ("negative-threshold", ["certify", *M, *R, "--threshold", "-1"], 2, "never negative"),
    ("nan-threshold", ["certify", *M, *R, "--threshold", "nan"], 2, "finite"),
    ("zero-budget", ["certify", *M, *R, "--time-budget", "0"], 2, "must be > 0"),
    ("negative-budget", ["certify", *M, *R, "--time-budget", "-5"], 2, "must be > 0"),
    ("nan-budget", ["certify", *M, *R, "--time-budget", "nan"], 2, "finite"),
    ("zero-jobs", ["certify", *M, *D, "--threshold", "1", "--jobs", "0"], 2, "--jobs"),
    ("negative-jobs", ["certify", *M, *D, "--threshold", "1", "--jobs", "-1"], 2, "--jobs"),
    ("zero-steps", ["search", *M, *R, "--steps", "0"], 2, "--steps"),
    ("resume-without-out", ["certify", *M, *D, "--threshold", "1", "--resume"], 2, "--resume needs --out"),
    ("data-without-threshold", ["certify", *M, *D], 2, "--threshold"),
    ("top1-without-data", ["certify", *M, *R, "--top1"], 2, "--data"),
    ("labels-mismatch", ["certify", *M, *D, "--threshold", "1", "--labels", "labels_short.npy"], 1, "labels"),
    ("uncertifiable-difference", ["certify", *M, *R, "--difference", "kl"], 1, "kl"),
    ("unknown-method", ["certify", *M, *R, "--method", "magic"], 2, "--method"),
    ("exact-for-one-model", ["certify", *M, *R, "--arithmetic", "exact", "--arithmetic-b", "fp16"], 2, "both models"),
    ("stability-unknown-trainer", ["stability", "--trainer", "nowhere:train"], 1, "cannot find"),
    ("stability-one-member", ["stability", "--members", "1"], 2, "--members"),
    ("stability-no-axes", ["stability", "--axes", ",", "--members", "2"], 2, "--axes"),
    ("unknown-command", ["certfy", *M], 2, "No such command"),
]


@pytest.mark.parametrize("name, args, code, message", PROBES, ids=[p[0] for p in PROBES])
def test_bad_input_is_one_line_with_the_documented_exit_code(files, name, args, code, message):
    out = next((args[i + 1] for i, a in enumerate(args) if a == "--out"), None)
    allowed = {str(files / out), str(files / Path(out).with_suffix(".jsonl"))} if out else set()
    before = _snapshot(files)
    result = subprocess.run([sys.executable, "-m", "diffprobe.cli", *args], cwd=files, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""
    after = _snapshot(files)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)} - allowed
    assert not changed, changed


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished --data run's record, to tamper with."""
    folder = tmp_path_factory.mktemp("resume")
    (folder / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    for name in ("a", "b"):
        torch.save(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).state_dict(), folder / f"{name}.pt")
    np.save(folder / "data.npy", np.random.default_rng(0).random((5, 3)).astype(np.float32))
    args = [sys.executable, "-m", "diffprobe.cli", "certify", *M, *D, "--threshold", "5", "--out", "run.json",
            "--quiet", "--json"]
    done = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder, args, (folder / "run.jsonl").read_text().splitlines(), json.loads(done.stdout)


def _spliced(lines):
    other = json.loads(lines[1])
    other["index"], other["verdict"] = 3, "verified"  # a line of another run would carry another chain
    return [lines[0], lines[1], json.dumps(other), *lines[3:]]


TAMPERED = {
    "spliced-line": _spliced,
    "index-99": lambda lines: [lines[0], *[l.replace('"index": 1,', '"index": 99,') for l in lines[1:]]],
    "random-bytes": lambda lines: [lines[0], lines[1], "\x00\x17garbage{", *lines[2:]],
    "reordered": lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
    "other-settings": lambda lines: [lines[0].replace('"threshold": 5.0', '"threshold": 4.0'), *lines[1:]],
}


@pytest.mark.parametrize("tamper", list(TAMPERED))
def test_resume_refuses_records_that_are_not_this_runs(finished_run, tamper, tmp_path):
    folder, args, lines, _ = finished_run
    work = tmp_path / "w"
    shutil.copytree(folder, work)
    (work / "run.jsonl").write_text("\n".join(TAMPERED[tamper](lines)) + "\n")
    result = subprocess.run(args + ["--resume"], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "line" in result.stderr or "other settings" in result.stderr


def test_resume_redoes_a_torn_last_line_and_answers_as_an_uninterrupted_run(finished_run, tmp_path):
    folder, args, lines, first = finished_run
    work = tmp_path / "w"
    shutil.copytree(folder, work)
    (work / "run.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:25]]) + "\n")  # cut mid-line
    result = subprocess.run(args + ["--resume"], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert [p["bound"] for p in again["points"]] == [p["bound"] for p in first["points"]]
    assert again["verdict"] == first["verdict"]


def _interrupted(args, folder, record, lines=3):
    """Run `args`, send Ctrl-C once `record` has `lines` lines, return (exit code, stderr)."""
    import signal
    import time
    process = subprocess.Popen([sys.executable, "-m", "diffprobe.cli", *args], cwd=folder, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if record.exists() and len(record.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _drift_files(folder, points):
    (folder / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    for name in ("a", "b"):
        torch.save(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).state_dict(), folder / f"{name}.pt")
    np.save(folder / "data.npy", np.random.default_rng(1).random((points, 3)).astype(np.float32))
    # a threshold between witness and bound: every point runs a search, so there is time to interrupt
    return ["certify", *M, "--data", "data.npy", "--eps", "0.3", "--threshold", "1.5", "--quiet", "--json",
            "--out", "run.json"]


def test_ctrl_c_exits_130_keeps_finished_points_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = _drift_files(tmp_path, 300)
    code, stderr = _interrupted(args, tmp_path, tmp_path / "run.jsonl", lines=3)
    lines = stderr.strip().splitlines()
    assert code == 130 and len(lines) == 1 and lines[0].startswith("diffprobe: interrupted"), stderr
    kept = len((tmp_path / "run.jsonl").read_text().splitlines()) - 1
    assert 0 < kept < 300
    resumed = subprocess.run([sys.executable, "-m", "diffprobe.cli", *args, "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    fresh = subprocess.run([sys.executable, "-m", "diffprobe.cli", *args[:-2], "--out", "fresh.json"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == fresh.returncode and resumed.returncode in (0, 5, 10), resumed.stderr
    first, second = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert [(p["bound"], p["found"], p["verdict"]) for p in first["points"]] == \
        [(p["bound"], p["found"], p["verdict"]) for p in second["points"]]


def test_ctrl_c_with_worker_processes_is_one_line(tmp_path):
    args = _drift_files(tmp_path, 3000) + ["--jobs", "2"]  # long enough to be interrupted mid-way
    code, stderr = _interrupted(args, tmp_path, tmp_path / "run.jsonl", lines=2)
    lines = stderr.strip().splitlines()
    assert code == 130 and len(lines) == 1 and lines[0].startswith("diffprobe: interrupted"), stderr


def test_a_hostile_result_file_is_escaped_in_the_report(tmp_path):
    from diffprobe.cli import main
    from click.testing import CliRunner
    point = {"index": "<script>alert(1)</script>", "bound": 1.0, "found": 0.5, "verdict": "unknown",
             "witness": None, "label_a": None, "label_b": None, "branches": 1, "seconds": 0.1, "notes": []}
    report = {"difference": "<b>x</b>", "eps": 0.1, "norm": "inf", "threshold": 1.0, "method": "auto",
              "points": [point], "counts": {"verified": 0, "falsified": 0, "unknown": 1}, "total": 1,
              "bound": 1.0, "found": 0.5, "verdict": "unknown", "accuracy_a": None, "accuracy_b": None,
              "agreement": None, "input_shape": [3], "seconds": 1.0, "notes": ["<img src=x onerror=alert(1)>"],
              "provenance": {"diffprobe": "0.1.0"}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page
    point["bound"] = "not a number"
    (tmp_path / "bad.json").write_text(json.dumps({**report, "points": [point]}))
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.html")])
    assert bad.exit_code == 1 and "malformed" in bad.stderr


def test_eps_1e300_is_unbounded_not_nan(tmp_path):
    from diffprobe.cli import main
    from click.testing import CliRunner
    (tmp_path / "arch.py").write_text(ARCH)
    torch.manual_seed(0)
    for name in ("a", "b"):
        torch.save(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).state_dict(), tmp_path / f"{name}.pt")
    np.save(tmp_path / "c.npy", np.zeros(3, dtype=np.float32))
    r = CliRunner().invoke(main, ["certify", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--arch",
                                  f"{tmp_path}/arch.py:net", "--center", str(tmp_path / "c.npy"), "--eps", "1e300",
                                  "--threshold", "1", "--json", "--quiet"])
    out = json.loads(r.stdout, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert r.exit_code in (5, 10) and out["verdict"] != "verified" and out["bound"] is None
