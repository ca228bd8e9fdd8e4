"""diffprobe's differential engine side by side with NeuroDiff (Paulsen et al., ASE 2020), the C
tool of the same method, on its own pairs and boxes: ACAS Xu N_1_1..N_1_9 vs fp16 on property 1,
MNIST 3x100 vs fp16 around test image 0, HAR vs 4-digit rounding around test input 0. Both bound
the output NeuroDiff checks (ACAS: output 0; MNIST and HAR: the true class), one thread each.

    python scripts/bench_neurodiff.py --neurodiff PATH/TO/delta_network_test [--threshold 60] [--docs]

NeuroDiff is not a dependency: build it from its public artifact
(github.com/pauls658/NeuroDiff-ASE2020-Artifact, folder DiffNN-Code) with Debian's OpenBLAS:
    apt-get install libopenblas-dev && make all CFLAGS="-Wall -fcommon -O3"
(-fcommon: its headers define a global in every object, which GCC >= 10 rejects by default).

Columns: the first pass's bound and time (NeuroDiff's own "time:" line with -m 0, i.e. no split;
diffprobe's engine built once beforehand, the median of 5 passes); with --threshold S, whether
each ACAS pair's output 0 is verified within eps = 1e-4 in S seconds (NeuroDiff's input splitting
vs diffprobe's certify with branch-and-bound) and how many sub-boxes each bounds per second there
(NeuroDiff's numSplits, diffprobe's branches: boxes bounded in batches, children starting from their
parents' bounds); process wall times of `diffprobe --help` and of one NeuroDiff run.
"""
import argparse
import copy
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe as dp
from diffprobe.bounds import build_problem, differential_engine
from diffprobe.deployment import deploy
from diffprobe.graph import fit_region

NETS = Path(__file__).resolve().parents[2] / "shared" / "nets"


def output_only(model, k):
    """A copy of an nn.Sequential whose last Linear layer keeps output k alone."""
    other = copy.deepcopy(model)
    last = [m for m in other if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight = torch.nn.Parameter(last.weight[k:k + 1].clone())
        last.bias = torch.nn.Parameter(last.bias[k:k + 1].clone())
    last.out_features = 1
    return other


def our_pass(a, b, region):
    """diffprobe's first-pass bound and its median time over 5 passes (one thread)."""
    deployment = deploy(a, b, [region], "exact")
    region = fit_region(region, deployment.pair.input_shape)
    engine = differential_engine(build_problem(deployment, "elementwise"))
    lo, hi = (t.unsqueeze(0) for t in region.bounding_box())
    lower, upper = engine.bounds(lo, hi)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.bounds(lo, hi)
        times.append(time.perf_counter() - t0)
    return max(-lower.min().item(), upper.max().item()), statistics.median(times)


def neurodiff_pass(binary, prop, net_a, net_b, *extra):
    """NeuroDiff's first-pass bound on its target output and its own time (median of 3 runs)."""
    times, bound = [], None
    for _ in range(3):
        out = _run(binary, prop, net_a, net_b, "100", "-m", "0", *extra)
        times.append(float(re.search(r"time: ([0-9.]+)", out).group(1)))
        low, high = (float(v) for v in re.search(r"Output delta interval: \[([-0-9.e]+), ([-0-9.e]+)\]", out).groups())
        bound = max(-low, high)
    return bound, statistics.median(times)


def _run(binary, *args, timeout=None):
    """NeuroDiff's output; at `timeout` it gets SIGINT, on which it prints its split count."""
    env = {"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen([str(binary), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            return process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            return process.communicate()[0]


def write_nnet(model, path, low, high):
    """An affine/ReLU nn.Sequential as an NNet file (no normalisation), inputs in [low, high]."""
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    n = sizes[0]
    rows = [f"{len(linears)},{n},{sizes[-1]},{max(sizes)},", ",".join(map(str, sizes)) + ",", "0,",
            ",".join([str(low)] * n) + ",", ",".join([str(high)] * n) + ",",
            ",".join(["0.0"] * (n + 1)) + ",", ",".join(["1.0"] * (n + 1)) + ","]
    for m in linears:
        w, b = m.weight.detach().double().numpy(), m.bias.detach().double().numpy()
        rows += [",".join(f"{v:.9g}" for v in row) + "," for row in w]
        rows += [f"{v:.9g}," for v in b]
    Path(path).write_text("\n".join(rows) + "\n")


def single_passes(binary, tmp):
    rows = []
    acas = [(NETS / f"acasxu/ACASXU_run2a_1_{k}_batch_2000.nnet", NETS / f"acasxu_fp16/ACASXU_run2a_1_{k}_batch_2000_16bit.nnet")
            for k in range(1, 10)]
    box = dp.box_from_vnnlib(NETS / "acasxu/prop_1.vnnlib")
    for path_a, path_b in acas:
        a, b = (output_only(dp.load_model(p), 0) for p in (path_a, path_b))
        ours, theirs = our_pass(a, b, box), neurodiff_pass(binary, 1, path_a, path_b)
        rows.append((f"ACAS N{path_a.name[12:16]} vs fp16, property 1, output 0", ours, theirs))
    mnist_a, mnist_b = NETS / "mnist_3x100/mnist_relu_3_100.nnet", NETS / "mnist_3x100/mnist_relu_3_100_16bit.nnet"
    image = torch.from_numpy(np.load(NETS / "mnist_3x100/mnist_test_inputs.npy")[0])
    label = int(dp.load_model(mnist_a).double()(image.double().unsqueeze(0)).argmax())
    a, b = (output_only(dp.load_model(p), label) for p in (mnist_a, mnist_b))
    for p in (1, 3, 8):
        ours = our_pass(a, b, dp.LinfBall(image, p / 255, (0, 1)))
        rows.append((f"MNIST 3x100 vs fp16, image 0, L-inf {p}/255", ours,
                     neurodiff_pass(binary, 400, mnist_a, mnist_b, "-p", p)))
    har = [dp.load_model(NETS / f"har/{name}.onnx") for name in ("HAR-trunc", "HAR-trunc-mirror")]
    har = [torch.nn.Sequential(*[m for m in h.modules() if isinstance(m, (torch.nn.Linear, torch.nn.ReLU))]) for h in har]
    x = torch.from_numpy(np.load(NETS / "har/har_test_inputs.npy")[0])
    files = [Path(tmp) / f"har_{i}.nnet" for i in range(2)]
    for model, path in zip(har, files):
        write_nnet(model, path, -1.0, 1.0)
    label = int(copy.deepcopy(har[0]).double()(x.double().unsqueeze(0)).argmax())
    a, b = (output_only(h, label) for h in har)
    for eps in (0.01, 0.1):
        rows.append((f"HAR vs 4-digit rounding, input 0, L-inf {eps}", our_pass(a, b, dp.LinfBall(x, eps, (-1, 1))),
                     neurodiff_pass(binary, 1000, *files, "-p", eps)))
    return rows


def thresholds(binary, seconds, eps=1e-4):
    """Per ACAS pair: verified within `seconds` by NeuroDiff, by diffprobe (and diffprobe's time)."""
    box = dp.box_from_vnnlib(NETS / "acasxu/prop_1.vnnlib")
    out = []
    for k in range(1, 10):
        path_a, path_b = (NETS / f"acasxu/ACASXU_run2a_1_{k}_batch_2000.nnet",
                          NETS / f"acasxu_fp16/ACASXU_run2a_1_{k}_batch_2000_16bit.nnet")
        t0 = time.perf_counter()
        log = _run(binary, 1, path_a, path_b, eps, timeout=seconds)
        theirs = "No adv!" in log, int(re.findall(r"numSplits: (\d+)", log)[-1]) / (time.perf_counter() - t0)
        a, b = (output_only(dp.load_model(p), 0) for p in (path_a, path_b))
        t0 = time.perf_counter()
        cert = dp.certify(a, b, box, threshold=eps, time_budget=seconds, method="differential", arithmetic="exact",
                          search_steps=20, search_restarts=2)
        spent = time.perf_counter() - t0
        out.append((k, *theirs, cert.verdict == "verified", spent, cert.bound, cert.branches / spent))
        print(f"  N_1_{k}: NeuroDiff {theirs}, diffprobe {cert.verdict} ({cert.bound:.3g}, {spent:.1f}s, "
              f"{cert.branches / spent:.0f} boxes/s)", file=sys.stderr, flush=True)
    return out


def wall_times(binary):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffprobe.cli", "--help"], capture_output=True)
    help_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run(binary, 1, NETS / "acasxu/ACASXU_run2a_1_1_batch_2000.nnet",
         NETS / "acasxu_fp16/ACASXU_run2a_1_1_batch_2000_16bit.nnet", 100, "-m", "0")
    return help_time, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurodiff", required=True, type=Path, help="NeuroDiff's delta_network_test binary")
    parser.add_argument("--threshold", type=float, default=0, metavar="SECONDS",
                        help="also the ACAS eps=1e-4 threshold runs with this budget each (0: skip)")
    parser.add_argument("--docs", action="store_true", help="write the tables into README.md")
    args = parser.parse_args()
    if not args.neurodiff.exists() or not NETS.exists():
        sys.exit("need NeuroDiff's delta_network_test (see this script's docstring) and ../shared/nets")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = single_passes(args.neurodiff, tmp)
    lines = ["| pair / box | diffprobe first-pass bound | NeuroDiff first-pass bound | diffprobe pass (ms) "
             "| NeuroDiff pass (ms) | time diffprobe / NeuroDiff |", "|---|---|---|---|---|---|"]
    for name, (ours, t_ours), (theirs, t_theirs) in rows:
        lines.append(f"| {name} | {ours:.3g} | {theirs:.3g} | {1e3 * t_ours:.2f} | {1e3 * t_theirs:.2f} "
                     f"| {t_ours / t_theirs:.2f} |")
    help_time, process = wall_times(args.neurodiff)
    lines += ["", f"Process wall time: `diffprobe --help` {help_time:.2f} s; one NeuroDiff run (load, one pass) "
                  f"{process:.3f} s."]
    if args.threshold:
        results = thresholds(args.neurodiff, args.threshold)
        lines += ["", f"| ACAS property 1, output 0, eps 1e-4, {args.threshold:g} s each | NeuroDiff verified "
                      "| diffprobe verified | diffprobe seconds | diffprobe bound | NeuroDiff splits/s "
                      "| diffprobe boxes bounded/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| N_1_{k} | {'yes' if t else 'no'} | {'yes' if o else 'no'} | {s:.1f} | {b:.3g} | {rt:.0f} "
                  f"| {ro:.0f} |" for k, t, rt, o, s, b, ro in results]
        lines.append(f"| all nine | {sum(r[1] for r in results)}/9 | {sum(r[3] for r in results)}/9 | | | | |")
    print("\n".join(lines))
    if args.docs:
        sys.path.insert(0, str(Path(__file__).parent))
        from docs_section import update_section
        update_section("README.md", "bench_neurodiff", "\n".join(lines))


if __name__ == "__main__":
    main()
