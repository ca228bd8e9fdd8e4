import ast
import gzip
import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import diffprobe as dp
from diffprobe.cli import main
from diffprobe import solve
from diffprobe.vnnlib2 import Atom, Query, confirmed_on_files, read_query, result_text
from conftest import examples, mlp, shifted

pytest.importorskip("vnnlib")

HEADER = """(vnnlib-version <2.0>)
(declare-network f (declare-input X float32 [1,{n}]) (declare-output Y float32 [1,{k}]))
(declare-network g (isomorphic-to f) (declare-input X2 float32 [1,{n}]) (declare-output Y2 float32 [1,{k}]))
"""


def query_text(n, k, eps, low=-1.0, high=1.0, ties=True, outputs=None):
    """The shape of VNN-COMP 2026's isomorphic_acasxu queries: a box, tied inputs, |Y - Y2| > eps."""
    box = " ".join(f"(>= X[0,{i}] {low}) (<= X[0,{i}] {high})" for i in range(n))
    tie = " ".join(f"(== X[0,{i}] X2[0,{i}])" for i in range(n)) if ties else ""
    outputs = outputs or " ".join(f"(> (- Y[0,{j}] Y2[0,{j}]) {eps}) (< (- Y[0,{j}] Y2[0,{j}]) -{eps})"
                                  for j in range(k))
    return HEADER.format(n=n, k=k) + f"(assert (and {box} {tie}))\n(assert (or {outputs}))\n"


def write(tmp_path, text, name="q.vnnlib", gz=False):
    path = tmp_path / (name + (".gz" if gz else ""))
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def test_the_benchmarks_query_maps_to_a_box_and_the_difference(tmp_path):
    q = read_query(write(tmp_path, query_text(3, 2, 0.05, -0.5, 0.25), gz=True))
    assert q.networks == ("f", "g") and q.congruence == "isomorphic-to" and q.names == ("X", "Y", "X2", "Y2")
    lo, hi = q.boxes[0].bounding_box()
    assert len(q.boxes) == 1 and lo.tolist() == [-0.5] * 3 and hi.tolist() == [0.25] * 3
    # (> (- Y Y2) eps) reads -D > eps with D = Y2 - Y; (< (- Y Y2) -eps) reads D > eps
    atoms = sorted((a.weights.tolist(), a.threshold, a.strict) for conjunct in q.violation for a in conjunct)
    assert atoms == [([-1.0, 0.0], 0.05, True), ([0.0, -1.0], 0.05, True),
                     ([0.0, 1.0], 0.05, True), ([1.0, 0.0], 0.05, True)]
    assert q.uniform_threshold() == 0.05
    d = torch.tensor([[0.0, 0.05], [0.0, -0.051], [0.049, -0.049]], dtype=torch.float64)
    assert q.violated(d).tolist() == [False, True, False]  # strict: exactly eps is no violation


def test_conjunctions_non_strict_atoms_and_several_output_assertions(tmp_path):
    text = HEADER.format(n=1, k=2) + ("(assert (and (>= X[0,0] 0.0) (<= X[0,0] 1.0) (== X[0,0] X2[0,0])))\n"
                                      "(assert (>= (- Y2[0,0] Y[0,0]) 0.5))\n"
                                      "(assert (or (<= (- Y2[0,1] Y[0,1]) -0.25) (>= Y2[0,1] (+ Y[0,1] 0.75))))\n")
    q = read_query(write(tmp_path, text))
    assert len(q.violation) == 2 and all(len(c) == 2 for c in q.violation)
    assert q.violated(torch.tensor([[0.5, -0.25], [0.5, 0.0], [0.4, 1.0]], dtype=torch.float64)).tolist() == \
        [True, False, False]
    # max |D_i| < 0.5 refutes both conjuncts through their first atom (>=: strictly below)
    assert q.uniform_threshold() == pytest.approx(0.5) and q.uniform_threshold() < 0.5
    assert q.refuted(torch.tensor([-0.4, 9.0]), torch.tensor([0.49, 9.0]))
    assert not q.refuted(torch.tensor([-0.4, -9.0]), torch.tensor([0.5, 9.0]))


@pytest.mark.parametrize("text, message", [
    (HEADER.format(n=1, k=1).split("(declare-network g")[0] + "(assert (and (>= X[0,0] 0.0) (<= X[0,0] 1.0)))\n"
     "(assert (> Y[0,0] 1.0))\n", "1-network query"),
    (query_text(2, 1, 0.1, ties=False), "not tied"),
    (query_text(1, 1, 0.1, outputs="(> Y[0,0] 0.5)"), "not a function of the difference"),
    (query_text(1, 1, 0.1, outputs="(> (- Y[0,0] (* 2.0 Y2[0,0])) 0.5)"), "not a function of the difference"),
    (query_text(1, 1, 0.1, outputs="(== Y[0,0] Y2[0,0])"), "Equal"),
    (query_text(1, 1, 0.1).replace("(<= X[0,0] 1.0)", ""), "lack a lower or upper bound"),
    (query_text(1, 1, 0.1).replace("(assert (or", "(assert (or (> X[0,0] Y[0,0])"), "a comparison over X, Y"),
    (query_text(1, 1, 0.1).replace("(assert (or", "(assert (or (> X[0,0] 0.5)"), "mixes input and output"),
    ("(vnnlib-version <2.0>) (declare-network", "not valid VNN-LIB 2.0"),
    (query_text(1, 1, 0.1).replace("1.0)", "1)"), "line 4: Type mismatch"),
])
def test_queries_diffprobe_cannot_answer_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(dp.RegionError, match=message) as info:
        read_query(write(tmp_path, text))
    assert "\n" not in str(info.value)


@settings(max_examples=examples(60), deadline=None)
@given(st.data())
def test_refutation_by_per_output_bounds_is_sound(data):
    k = data.draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    atom = lambda: Atom(torch.randn(k, generator=gen, dtype=torch.float64).round(decimals=1),
                        float(torch.randn(1, generator=gen)), bool(torch.rand(1, generator=gen) < 0.5))
    violation = [[atom() for _ in range(data.draw(st.integers(1, 2)))] for _ in range(data.draw(st.integers(1, 3)))]
    q = Query(("f", "g"), (1,), (k,), [], violation)
    centre, radius = torch.randn(k, generator=gen, dtype=torch.float64), torch.rand(k, generator=gen, dtype=torch.float64)
    lower, upper = centre - radius, centre + radius
    d = lower + (upper - lower) * torch.rand(4000, k, generator=gen, dtype=torch.float64)
    d = torch.cat([d, lower[None], upper[None], torch.where(torch.rand(64, k, generator=gen) < 0.5, lower, upper)])
    if q.refuted(lower, upper):
        assert not q.violated(d).any()
    if q.uniform_threshold() is not None:  # max |D_i| <= t refutes every conjunct
        t = q.uniform_threshold()
        assert q.refuted(torch.full((k,), -t, dtype=torch.float64), torch.full((k,), t, dtype=torch.float64))


def test_solve_certifies_a_shifted_copy_and_falsifies_it_below_the_shift(tmp_path):
    a = mlp([3, 8, 2], 0)
    b = shifted(a, 0.2)  # every output moves by 0.2 everywhere
    safe = solve(a, b, write(tmp_path, query_text(3, 2, 0.25), "safe.vnnlib"), timeout=30)
    assert safe.result == "unsat" and 0.2 <= safe.bound <= 0.25 and safe.counterexample is None
    bad_query = read_query(write(tmp_path, query_text(3, 2, 0.15), "bad.vnnlib"))
    bad = solve(a, b, bad_query, timeout=30)
    assert bad.result == "sat" and bad.counterexample["margin"] > 0
    x = torch.tensor(bad.counterexample["input"])
    assert torch.equal(x, x.float().double()) and bool(((x >= -1) & (x <= 1)).all())  # float32, inside
    with torch.no_grad():
        d = (b(x.float()[None]) - a(x.float()[None])).double()
    assert bool(bad_query.violated(d)[0])
    text = result_text(bad_query, bad.result, bad.counterexample)
    values = dict(re.findall(r"\((\w+\[[\d,]+\]) ([^()\s]+)\)", text))
    assert text.startswith("sat\n") and set(values) == {f"{v}[0,{i}]" for v in ("X", "X2") for i in range(3)} | \
        {f"{v}[0,{j}]" for v in ("Y", "Y2") for j in range(2)}
    assert float(values["X2[0,1]"]) == float(values["X[0,1]"]) == bad.counterexample["input"][1]
    assert dp.QueryResult.from_json(bad.to_json()) == bad


def _onnx_pair(tmp_path, shift):
    pytest.importorskip("onnx")
    a = mlp([3, 8, 2], 1)
    paths = []
    for name, model in (("f", a), ("g", shifted(a, shift))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.float(), (torch.zeros(1, 3),), str(tmp_path / f"{name}.onnx"), dynamo=False)
        paths.append(tmp_path / f"{name}.onnx")
    return paths


def test_cli_answers_an_instance_in_the_competitions_format(tmp_path, monkeypatch):
    f, g = _onnx_pair(tmp_path, 0.2)
    monkeypatch.chdir(tmp_path)
    write(tmp_path, query_text(3, 2, 0.25), "safe.vnnlib", gz=True)
    write(tmp_path, query_text(3, 2, 0.1), "bad.vnnlib")
    field = str([("f", "f.onnx"), ("g", "g.onnx")])  # instances.csv's field, paths relative to the benchmark
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])
    r = run("solve", "safe.vnnlib.gz", field, "--timeout", 30, "--result", "out.txt")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "unsat" and (tmp_path / "out.txt").read_text() == "unsat\n"
    r = run("solve", "bad.vnnlib", "f=f.onnx", "g=g.onnx", "--timeout", 30, "--result", "out.txt", "--json")
    assert r.exit_code == 10, r.output
    answer = json.loads(r.stdout)
    assert answer["result"] == "sat" and (tmp_path / "out.txt").read_text().startswith("sat\n((X[0,0] ")
    query = read_query(tmp_path / "bad.vnnlib")
    assert confirmed_on_files([f, g], query, answer["counterexample"])  # onnx's own evaluator agrees
    assert not confirmed_on_files([f, f], query, answer["counterexample"])
    r = run("solve", "bad.vnnlib", "[('f', 'f.onnx'", "--result", "out.txt")
    assert r.exit_code == 2 and "networks field" in r.stderr
    (tmp_path / "notes.txt").write_text("mine")
    r = run("solve", "bad.vnnlib", field, "--result", "notes.txt")
    assert r.exit_code == 1 and (tmp_path / "notes.txt").read_text() == "mine"
    r = run("solve", "bad.vnnlib", "f.onnx", "f.onnx", "--timeout", 30)  # one network twice: D = 0
    assert r.exit_code == 0 and r.stdout.strip() == "unsat"


def test_instances_csv_field_is_read_without_running_code(tmp_path):
    r = CliRunner().invoke(main, ["solve", str(write(tmp_path, query_text(1, 1, 0.1))),
                                  "[__import__('os').system('touch pwned')]"])
    assert r.exit_code == 2 and not (tmp_path / "pwned").exists()
    assert ast.literal_eval(str([("f", "a.onnx")])) == [("f", "a.onnx")]


def test_run_instance_answers_within_its_timeout_start_up_included(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    _onnx_pair(tmp_path, 0.2)
    write(tmp_path, query_text(3, 2, 0.25), "safe.vnnlib", gz=True)
    script = Path(__file__).resolve().parents[1] / "vnncomp" / "run_instance.sh"
    env = {**os.environ, "DIFFPROBE": str(Path(sys.executable).parent / "diffprobe")}
    field = str([("f", "f.onnx"), ("g", "g.onnx")])
    for timeout, expected in ((60, "unsat"), (1.5, "timeout")):  # 1.5 s: killed while Python starts
        t0 = time.perf_counter()
        subprocess.run(["bash", str(script), "v1", "test", field, "safe.vnnlib.gz", "result.txt", str(timeout)],
                       cwd=tmp_path, env=env, check=True, capture_output=True)
        assert (tmp_path / "result.txt").read_text().strip() == expected
        assert time.perf_counter() - t0 <= timeout + 1.0
