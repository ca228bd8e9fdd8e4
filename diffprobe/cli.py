"""The `diffprobe` command: parse, load, call the Python API, render, exit code.

Exit codes: 0 success / verified, 10 falsified, 5 unknown, 1 errors, 2 usage (click's).
"""
import contextlib
import functools
import json
import math
import sys
import warnings

import click

from . import __version__
from .differences import DIFFERENCES
from .errors import DiffprobeError, RegionError
from .results import Verdict

EXIT = {None: 0, Verdict.VERIFIED: 0, Verdict.FALSIFIED: 10, Verdict.UNKNOWN: 5}
METHOD_CHOICES = ["auto", "ibp", "crown", "alpha-crown", "differential", "alpha-differential"]


def _friendly(fn):
    """User mistakes become one line on stderr and exit 1; Ctrl-C exits 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffprobeError as exc:
            click.echo(f"diffprobe: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("diffprobe: interrupted", err=True)
            sys.exit(130)
    return wrapper


def model_options(fn):
    options = [
        click.argument("model_a", type=click.Path(dir_okay=False)),
        click.argument("model_b", type=click.Path(dir_okay=False)),
        click.option("--arch", help="architecture for state_dict/safetensors files: module:factory or file.py:factory"),
        click.option("--arch-b", help="architecture for MODEL_B when it differs from --arch"),
        click.option("--arch-kwargs", default=None, help="JSON keyword arguments for the factory"),
        click.option("--trust", is_flag=True, help="allow files that can run code when loaded (pickled modules, .pt2)"),
        click.option("--normalize", is_flag=True, help="apply NNet files' input/output normalisation"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def region_options(fn):
    options = [
        click.option("--vnnlib", type=click.Path(dir_okay=False), help="input box of a VNN-LIB property"),
        click.option("--center", type=click.Path(dir_okay=False), help="ball centre (.npy/.npz/.pt/.safetensors)"),
        click.option("--index", type=int, default=0, show_default=True, help="row of --center when it holds several points"),
        click.option("--eps", type=float, help="ball radius (with --center)"),
        click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True),
        click.option("--clip", type=float, nargs=2, help="valid input range LO HI"),
        click.option("--box", type=float, nargs=2, help="box LO HI applied to every input"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def common_options(fn):
    from .deployment import ARITHMETICS
    options = [
        click.option("--difference", type=click.Choice(list(DIFFERENCES)), default="elementwise", show_default=True),
        click.option("--arithmetic", type=click.Choice(ARITHMETICS), default="native", show_default=True,
                     help="what the models run in: native (as loaded: fp16 in fp16, int8 as int8), exact "
                          "(stored weights, real arithmetic), or a float format to cast to"),
        click.option("--arithmetic-b", type=click.Choice(ARITHMETICS),
                     help="MODEL_B's arithmetic when it differs from --arithmetic"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout"),
        click.option("--quiet", is_flag=True, help="no progress on stderr"),
        click.option("--mlflow", "to_mlflow", is_flag=True,
                     help="also log the result to MLflow (active tracking settings)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize):
    from .loading import load_model
    kw = dict(arch_kwargs=arch_kwargs, trust=trust, normalize=normalize)
    return load_model(model_a, arch=arch, **kw), load_model(model_b, arch=arch_b or arch, **kw)


def make_region(model_a, model_b, vnnlib, center, index, eps, norm, clip, box):
    import torch
    from .data import load_tensor
    from .graph import common_input_shape
    from .regions import Box, ball, box_from_vnnlib
    given = [name for name, v in (("--vnnlib", vnnlib), ("--center", center), ("--box", box)) if v]
    if len(given) != 1:
        raise RegionError("give exactly one region: --vnnlib FILE, --center FILE --eps E, or --box LO HI")
    if vnnlib:
        return box_from_vnnlib(vnnlib)
    if box:
        shape = common_input_shape(model_a, model_b)
        return Box(torch.full(shape, box[0], dtype=torch.float64), torch.full(shape, box[1], dtype=torch.float64))
    if eps is None:
        raise RegionError("--center needs --eps E (the ball radius)")
    points = load_tensor(center)
    shape = common_input_shape(model_a, model_b)
    n = math.prod(shape)
    if points.numel() != n:
        if points.numel() % n or not 0 <= index < points.numel() // n:
            raise RegionError(f"{center} holds {points.numel()} values, not a whole number of inputs of "
                              f"shape {list(shape)}, or --index {index} is out of range")
        points = points.reshape(-1, n)[index]
    return ball(points.reshape(shape).double(), eps, norm, clip)


def emit(result, as_json, text, to_mlflow=False):
    if to_mlflow:
        from .tracking import log_to_mlflow
        log_to_mlflow(result)
    click.echo(result.to_json() if as_json else text)


@click.group()
@click.version_option(__version__, prog_name="diffprobe")
def main():
    """How differently can two neural networks behave? Witnesses by search, bounds by certification."""
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A Python warning on the command line: one line on stderr, not the source line it came from.
    torch's notices about its own deprecations (raised while loading quantised checkpoints) are
    not the user's concern and are dropped."""
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or \
            _inside(filename, "torch") or _inside(filename, "torchao"):
        return
    click.echo(f"diffprobe: warning: {message}", err=True)


def _inside(filename, package):
    import os
    return f"{os.sep}site-packages{os.sep}{package}{os.sep}" in str(filename)


@main.command()
@model_options
@region_options
@common_options
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--restarts", type=int, default=8, show_default=True)
@click.option("--threshold", type=float, help="stop early once exceeded; exit 10 if it is")
@click.option("--save-witness", type=click.Path(dir_okay=False), help="write the witness as .npy")
@click.option("--data", type=click.Path(exists=True),
              help="data file or folder: its points inside the region nearest a decision boundary start restarts")
@_friendly
def search(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize, vnnlib, center, index, eps,
           norm, clip, box, difference, arithmetic, arithmetic_b, seed, as_json, quiet, to_mlflow, steps, restarts,
           threshold, save_witness, data):
    """Find the input in a region where MODEL_A and MODEL_B disagree most."""
    from . import search as run_search
    from .report import search_text
    a, b = load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize)
    region = make_region(a, b, vnnlib, center, index, eps, norm, clip, box)
    result = run_search(a, b, region, difference=difference, steps=steps, restarts=restarts, seed=seed,
                        threshold=threshold, data=data, arithmetic=arithmetic, arithmetic_b=arithmetic_b,
                        progress=not quiet)
    if save_witness:
        import numpy as np
        np.save(save_witness, result.witness().numpy())
    emit(result, as_json, search_text(result), to_mlflow)
    sys.exit(10 if threshold is not None and result.found > threshold else 0)


def _certify_command(name, doc, search_steps):
    @main.command(name=name, help=doc)
    @model_options
    @region_options
    @common_options
    @click.option("--method", type=click.Choice(METHOD_CHOICES), default="auto", show_default=True)
    @click.option("--threshold", type=float, help="verdict: verified if bound <= T, falsified if a witness exceeds T")
    @click.option("--time-budget", type=float, help="seconds for branch-and-bound (per point with --data; off without it)")
    @data_options
    @_friendly
    def command(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize, vnnlib, center, index, eps,
                norm, clip, box, difference, arithmetic, arithmetic_b, seed, as_json, quiet, to_mlflow, method,
                threshold, time_budget, data, labels, top1, jobs, out, resume):
        a, b = load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize)
        if data:
            return _drift(a, b, data, labels, eps, norm, clip, threshold, difference, top1, method,
                          time_budget, jobs, out, resume, seed, search_steps, as_json, quiet, to_mlflow,
                          arithmetic, arithmetic_b)
        if top1 or jobs > 1 or resume or labels:
            raise RegionError("--top1, --jobs, --labels and --resume work with --data FILE")
        from . import certify
        from .report import certificate_text
        region = make_region(a, b, vnnlib, center, index, eps, norm, clip, box)
        result = certify(a, b, region, difference=difference, method=method, threshold=threshold,
                         time_budget=time_budget, seed=seed, search_steps=search_steps, arithmetic=arithmetic,
                         arithmetic_b=arithmetic_b, progress=not quiet)
        _save(result, out)
        emit(result, as_json, certificate_text(result), to_mlflow)
        sys.exit(EXIT[result.verdict])
    return command


def data_options(fn):
    options = [
        click.option("--data", type=click.Path(exists=True), help="certify around every point of a data file or folder"),
        click.option("--labels", type=click.Path(dir_okay=False), help="labels for --data (else a 'y'/'labels' entry of it)"),
        click.option("--top1", is_flag=True, help="certify top-1 label agreement around each point (threshold 0)"),
        click.option("--jobs", type=int, default=1, show_default=True, help="worker processes for --data"),
        click.option("--out", type=click.Path(dir_okay=False), help="write the result as JSON here (with --data, "
                     "finished points also go to OUT's .jsonl while running)"),
        click.option("--resume", is_flag=True, help="continue the --data run recorded next to --out"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _drift(a, b, data, labels, eps, norm, clip, threshold, difference, top1, method, time_budget, jobs,
           out, resume, seed, search_steps, as_json, quiet, to_mlflow, arithmetic="native", arithmetic_b=None):
    import os
    from . import drift
    from .data import load_tensor
    from .report import drift_text
    if resume and not out:
        raise RegionError("--resume needs --out FILE (the run to continue is recorded next to it)")
    if threshold is None and not top1:
        raise RegionError("--data needs --threshold T (or --top1)")
    with process_pool(jobs) as executor:
        report = drift(a, b, data, labels=load_tensor(labels) if labels else None, eps=eps,
                       norm=norm, clip=clip, threshold=threshold, difference=difference, top1=top1,
                       method=method, time_budget_per_point=time_budget, executor=executor,
                       threads_per_job=max(1, (os.cpu_count() or 1) // jobs) if executor else 0,
                       search_steps=search_steps, seed=seed, checkpoint=checkpoint_path(out),
                       resume=resume, arithmetic=arithmetic, arithmetic_b=arithmetic_b, progress=not quiet)
    _save(report, out)
    emit(report, as_json, drift_text(report), to_mlflow)
    sys.exit(130 if report.total > len(report.points) else EXIT[report.verdict])


@contextlib.contextmanager
def process_pool(jobs):
    """A spawn process pool for --jobs N > 1 (workers import torch afresh rather than fork a
    threaded parent), else None; pending jobs are cancelled on the way out."""
    if jobs <= 1:
        yield None
        return
    import concurrent.futures
    import multiprocessing
    executor = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield executor
    finally:
        executor.shutdown(cancel_futures=True)


def checkpoint_path(out):
    """The JSON Lines record of finished points that sits next to --out."""
    if not out:
        return None
    from pathlib import Path
    return str(Path(out).with_suffix(".jsonl"))


def _save(result, out):
    if out:
        with open(out, "w") as handle:
            handle.write(result.to_json(indent=1))


_certify_command("certify", "Bound how much MODEL_A and MODEL_B can differ over a region.", 50)
_certify_command("compare", "Search and certify in one report, with a larger search budget.", 200)


@main.command()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eps", type=float, default=0.02, show_default=True)
@click.option("--threshold", type=float, default=3.0, show_default=True, help="allowed logit drift")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@_friendly
def demo(seed, eps, threshold, as_json, quiet):
    """Train a digits classifier and a fine-tuned copy, then search and certify their drift."""
    from .report import demo_text
    from .demo import run_demo
    report = run_demo(seed=seed, eps=eps, threshold=threshold, progress=not quiet)
    click.echo(json.dumps(report["json"]) if as_json else demo_text(report))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default="report.html", show_default=True)
@_friendly
def report(files, out):
    """Render saved results (--out JSON of search/certify/compare/stability, or a result's to_json())
    as one HTML page with figures; several drift reports at different eps also give the
    certified-bound-vs-eps curve."""
    from .report import html_report, load_result
    results = [load_result(f) for f in files]
    with open(out, "w") as handle:
        handle.write(html_report(results))
    click.echo(f"wrote {out}")


@main.command()
@click.option("--trainer", default="diffprobe.trainers:digits", show_default=True,
              help="train(config) -> model, as module:function or path/file.py:function")
@click.option("--axes", default="seed,bootstrap,lr", show_default=True,
              help="comma-separated: seed, data_order, bootstrap, lr, momentum, or KEY=V1:V2:... for a config key of yours")
@click.option("--members", type=int, default=4, show_default=True, help="members per axis")
@click.option("--data", type=click.Path(exists=True), help="held-out inputs (default: the trainer's heldout())")
@click.option("--eps", type=float, default=0.05, show_default=True, help="radius of the worst-case balls")
@click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True)
@click.option("--clip", type=float, nargs=2, default=(0.0, 1.0), show_default=True)
@click.option("--regions", type=int, default=5, show_default=True, help="held-out points with a worst-case ball (0: sampled distances only)")
@click.option("--rank-by", type=click.Choice(["kl", "js", "disagreement", "found", "certified"]), default="js", show_default=True)
@click.option("--jobs", type=int, default=1, show_default=True, help="worker processes for training")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="write the study as JSON; trained members go to OUT's .members folder")
@click.option("--resume", is_flag=True, help="reuse the members already trained for --out")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@_friendly
def stability(trainer, axes, members, data, eps, norm, clip, regions, rank_by, jobs, seed, out, resume,
              as_json, quiet):
    """How far apart do models trained with perturbed initial conditions land? Trains MEMBERS
    models per axis, measures pairwise distances, ranks the axes by spread."""
    import shutil
    from pathlib import Path
    from . import stability as run_study
    from .report import stability_text
    if resume and not out:
        raise RegionError("--resume needs --out FILE (the members are kept next to it)")
    members_dir = Path(out).with_suffix(".members") if out else None
    if members_dir and members_dir.exists() and not resume:
        shutil.rmtree(members_dir)
    with process_pool(jobs) as executor:
        study = run_study(trainer, axes=parse_axes(axes), members=members, heldout=data, eps=eps, norm=norm,
                          clip=clip, regions=regions, rank_by=rank_by, executor=executor,
                          members_dir=members_dir, seed=seed, progress=not quiet)
    _save(study, out)
    emit(study, as_json, stability_text(study))


def parse_axes(text):
    """'seed,lr,width=16:32:64' -> ['seed', 'lr', ('width', [16, 32, 64])]."""
    axes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" in item:
            name, values = item.split("=", 1)
            axes.append((name, [_scalar(v) for v in values.split(":")]))
        else:
            axes.append(item)
    if not axes:
        raise RegionError("--axes names no axis; e.g. --axes seed,bootstrap,lr")
    return axes


def _scalar(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


if __name__ == "__main__":
    main()
