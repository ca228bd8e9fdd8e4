"""A benchmark built like VNN-COMP 2026's `isomorphic_acasxu_2026`, run through the competition's
tool interface (`vnncomp/run_instance.sh`).

From the shared ACAS Xu networks diffprobe writes 50 instances: the original ONNX network f, a copy
g with seeded N(0, sigma) noise on every parameter (sigma 1e-3 as in the benchmark; 1e-2 and 3e-2
on two instances of five, so that some properties are close and some fail), and a VNN-LIB 2.0 query (`(declare-network g (isomorphic-to f) ...)`, inputs
tied by `(== X[0,i] X2[0,i])`, property 1's input box, violation |Y_f - Y_g| > 0.05 on any output),
gzipped, with an `instances.csv` in the competition's layout. Each instance runs with a 100 s
timeout; every `unsat` is checked by sampling 20,000 inputs of the box, every `sat` by its
counterexample on the ONNX files (onnx's reference evaluator).

    python scripts/bench_vnncomp.py [--instances 50] [--timeout 100] [--folder DIR] [--docs]
"""
import argparse
import ast
import csv
import gzip
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import diffprobe as dp
from diffprobe.vnnlib2 import confirmed_on_files, read_query

ROOT = Path(__file__).resolve().parents[1]
NETS = ROOT.parent / "shared" / "nets" / "acasxu"
LOW, HIGH = [0.6, -0.5, -0.5, 0.45, -0.5], [0.679857769, 0.5, 0.5, 0.5, -0.45]  # property 1
EPS = 0.05
SIGMAS = (1e-3, 1e-3, 1e-3, 1e-2, 3e-2)  # the benchmark's noise; larger on two of five so that some fail


def perturbed(source, target, sigma, seed):
    """The ONNX network at `source` with N(0, sigma) added to every float parameter."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype.kind == "f":
            noisy = value + rng.normal(0.0, sigma, value.shape).astype(value.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(target))


def query_text():
    box = " ".join(f"(>= X[0,{i}] {lo}) (<= X[0,{i}] {hi})" for i, (lo, hi) in enumerate(zip(LOW, HIGH)))
    ties = " ".join(f"(== X[0,{i}] X2[0,{i}])" for i in range(5))
    outputs = " ".join(f"(> (- Y[0,{i}] Y2[0,{i}]) {EPS}) (< (- Y[0,{i}] Y2[0,{i}]) -{EPS})" for i in range(5))
    return ("(vnnlib-version <2.0>)\n"
            "(declare-network f (declare-input X float32 [1,5]) (declare-output Y float32 [1,5]))\n"
            "(declare-network g (isomorphic-to f) (declare-input X2 float32 [1,5]) (declare-output Y2 float32 [1,5]))\n"
            f"(assert (and {box} {ties}))\n(assert (or {outputs}))\n")


def write_benchmark(folder, count, timeout):
    """The instances in the competition's layout; returns the rows of instances.csv."""
    (folder / "onnx" / "original").mkdir(parents=True, exist_ok=True)
    (folder / "onnx" / "perturbed").mkdir(parents=True, exist_ok=True)
    (folder / "vnnlib").mkdir(exist_ok=True)
    nets = sorted(NETS.glob("ACASXU_run2a_*_batch_2000.onnx"))
    with gzip.open(folder / "vnnlib" / "prop_1_isomorphic.vnnlib.gz", "wt") as handle:
        handle.write(query_text())
    rows = []
    for k in range(count):
        net = nets[k % len(nets)]
        f = folder / "onnx" / "original" / net.name
        f.write_bytes(net.read_bytes())
        sigma = SIGMAS[k % len(SIGMAS)]
        g = folder / "onnx" / "perturbed" / net.name.replace(".onnx", f"_perturbed_{k}.onnx")
        perturbed(net, g, sigma, seed=k)
        field = str([("f", str(f.relative_to(folder))), ("g", str(g.relative_to(folder)))])
        rows.append([field, "vnnlib/prop_1_isomorphic.vnnlib.gz", str(timeout)])
    with open(folder / "instances.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return rows


def check(folder, field, answer):
    """Whether the answer holds: unsat by sampling the box, sat by its counterexample."""
    f, g = (folder / p for _, p in ast.literal_eval(field))
    query = read_query(folder / "vnnlib" / "prop_1_isomorphic.vnnlib.gz")
    if answer.startswith("sat"):
        values = dict(re.findall(r"\((\w+\[[\d,]+\]) ([^()\s]+)\)", answer))
        counterexample = {"input": [float(values[f"X[0,{i}]"]) for i in range(5)]}
        return confirmed_on_files([f, g], query, counterexample)
    if answer.startswith("unsat"):
        a, b = dp.load_model(f), dp.load_model(g)
        x = torch.rand(20_000, 5, generator=torch.Generator().manual_seed(0))
        x = torch.tensor(LOW) + x * (torch.tensor(HIGH) - torch.tensor(LOW))
        with torch.no_grad():
            d = (b(x.reshape(-1, 1, 1, 5)) - a(x.reshape(-1, 1, 1, 5))).reshape(len(x), -1).double()
        return not bool(query.violated(d).any())
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=100)
    parser.add_argument("--folder", type=Path, help="write the benchmark here (default: a temporary folder)")
    parser.add_argument("--docs", action="store_true", help="also rewrite the table in README.md")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_vnncomp."))
    rows = write_benchmark(folder, args.instances, int(args.timeout))
    run = ROOT / "vnncomp" / "run_instance.sh"
    env = {**os.environ, "DIFFPROBE": os.environ.get("DIFFPROBE", str(Path(sys.executable).parent / "diffprobe"))}
    counts, wrong, total, worst = {}, 0, 0.0, 0.0
    for k, (field, vnnlib, timeout) in enumerate(rows):
        result = folder / f"result_{k}.txt"
        t0 = time.perf_counter()
        subprocess.run(["bash", str(run), "v1", "isomorphic_acasxu", field, vnnlib, str(result), timeout],
                       cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        answer = result.read_text() if result.exists() else "missing"
        word = answer.split()[0] if answer.split() else "missing"
        ok = check(folder, field, answer)
        wrong += ok is False
        counts[word] = counts.get(word, 0) + 1
        total, worst = total + seconds, max(worst, seconds)
        print(f"{k:>3} {word:<8} {seconds:6.1f}s  {'checked' if ok else 'WRONG' if ok is False else '-'}  {field}",
              flush=True)
    table = ("| instances | unsat (verified) | sat (falsified) | unknown / timeout | wrong | total time | slowest |\n"
             "|---|---|---|---|---|---|---|\n"
             f"| {len(rows)} | {counts.get('unsat', 0)} | {counts.get('sat', 0)} | "
             f"{counts.get('unknown', 0) + counts.get('timeout', 0)} | {wrong} | {total:.0f} s | {worst:.1f} s |")
    print(table)
    if args.docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from docs_section import update_section
        update_section("README.md", "bench_vnncomp", table)


if __name__ == "__main__":
    main()
