"""The `diffprobe` command: parse, check, load, call the Python API, render, exit code.

Exit codes: 0 success / verified, 10 falsified, 5 unknown, 1 errors, 2 usage (click's), 130
interrupted. Every error is one line on stderr.
"""
import contextlib
import functools
import json
import math
import os
import sys
import warnings

import click

from .version import __version__
from .errors import DiffprobeError

# torch and everything that needs it is imported when a command runs, not for `diffprobe --help`
EXIT = {None: 0, "verified": 0, "falsified": 10, "unknown": 5}  # by verdict value


class _RegistryChoice(click.Choice):
    """A choice among a registry's names, read when first needed (the registries import torch)."""

    def __init__(self, names, **kwargs):
        self._names = names
        super().__init__((), **kwargs)

    @property
    def choices(self):
        return tuple(self._names())

    @choices.setter
    def choices(self, value):
        pass


def _differences():
    from .differences import DIFFERENCES
    return list(DIFFERENCES)


def _arithmetics():
    from .deployment import ARITHMETICS
    return ARITHMETICS


def _devices():
    from .deployment import DEVICES
    return DEVICES


def _methods():
    from .certification import METHOD_NAMES
    return METHOD_NAMES

# the library speaks in API terms; on the command line they read as flags
_CLI_TERMS = {"trust=True": "--trust", "force=True": "--force", "arch_kwargs=": "--arch-kwargs",
              "arch=": "--arch ", "eps=": "--eps ", "clip=": "--clip ", "heldout=...": "--data FILE",
              "trainer=": "--trainer ", "threshold=": "--threshold ", "resume": "--resume",
              "base={'lr': ...}": "--base lr=...", "base={'momentum': ...}": "--base momentum=...",
              "device 'cpu' or 'auto'": "--device cpu or --device auto"}


def _in_cli_terms(message):
    for api, flag in _CLI_TERMS.items():
        message = message.replace(api, flag)
    return message.replace("  ", " ").replace(" )", ")")


def _friendly(fn):
    """Errors become one line on stderr (exit 1), Ctrl-C exits 130 quietly (a second Ctrl-C too);
    anything unexpected is one line as well (DIFFPROBE_DEBUG=1 shows the traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffprobeError as exc:
            _fail(f"diffprobe: error: {_in_cli_terms(str(exc))}", 1)
        except KeyboardInterrupt:
            _fail("diffprobe: interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("DIFFPROBE_DEBUG"):
                raise
            _fail(f"diffprobe: error: unexpected {type(exc).__name__}: {str(exc)[:300]} (a bug: please report "
                  "it; DIFFPROBE_DEBUG=1 shows where)", 1)
    return wrapper


def _fail(line, code):
    _ignore_interrupts()  # a second Ctrl-C while exiting changes nothing
    click.echo(" ".join(line.split()), err=True)
    sys.exit(code)


def _ignore_interrupts():
    import signal
    with contextlib.suppress(ValueError):  # only the main thread may (CliRunner in a thread)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class Number(click.ParamType):
    """A finite number, at least (or above) `low`."""

    name = "number"

    def __init__(self, low=None, above=False):
        self.low, self.above = low, above

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        if self.low is not None and (number < self.low or (self.above and number == self.low)):
            self.fail(f"{value} must be {'>' if self.above else '>='} {self.low:g}", param, ctx)
        return number


FINITE, NON_NEGATIVE, POSITIVE = Number(), Number(0.0), Number(0.0, above=True)
AT_LEAST_ONE = click.IntRange(min=1)


def _options(*options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return wrap


model_options = _options(
    click.argument("model_a", type=click.Path()),
    click.argument("model_b", type=click.Path()),
    click.option("--arch", help="architecture for state_dict/safetensors files: module:factory or file.py:factory "
                 "(runs that module's code)"),
    click.option("--arch-b", help="architecture for MODEL_B when it differs from --arch"),
    click.option("--arch-kwargs", default=None, help="JSON keyword arguments for the factory"),
    click.option("--trust", is_flag=True, help="allow files that can run code when loaded (pickled modules, .pt2)"),
    click.option("--normalize", is_flag=True, help="apply NNet files' input/output normalisation"),
)

region_options = _options(
    click.option("--vnnlib", type=click.Path(dir_okay=False), help="input box of a VNN-LIB property"),
    click.option("--center", type=click.Path(dir_okay=False), help="ball centre (.npy/.npz/.pt/.safetensors)"),
    click.option("--index", type=click.IntRange(min=0), default=0, show_default=True,
                 help="row of --center when it holds several points"),
    click.option("--eps", type=NON_NEGATIVE, help="ball radius (with --center)"),
    click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True),
    click.option("--clip", type=FINITE, nargs=2, help="valid input range LO HI"),
    click.option("--box", type=FINITE, nargs=2, help="box LO HI applied to every input"),
)


def common_options(fn):
    return _options(
        click.option("--difference", type=_RegistryChoice(_differences), default="elementwise", show_default=True),
        click.option("--arithmetic", type=_RegistryChoice(_arithmetics), default="native", show_default=True,
                     help="what the models run in: native (as loaded: fp16 in fp16, int8 as int8), exact "
                          "(stored weights, real arithmetic), or a float format to cast to"),
        click.option("--arithmetic-b", type=_RegistryChoice(_arithmetics),
                     help="MODEL_B's arithmetic when it differs from --arithmetic"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=_RegistryChoice(_devices), default="cpu", show_default=True,
                     help="where the search runs the models (auto: CUDA when there is a GPU); bounds are "
                          "computed on the CPU in float64"),
        click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout"),
        click.option("--quiet", is_flag=True, help="no progress on stderr"),
        click.option("--mlflow", "to_mlflow", is_flag=True,
                     help="also log the result to MLflow (active tracking settings)"),
        click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="with top-1: only where MODEL_A's top probability is at least this "
                          "(delta-top-1 equivalence)"),
    )(_with_confidence(fn))


def _with_confidence(fn):
    """`--difference top1 --confidence D` (or `--top1 --confidence D`) is the difference `top1@D`."""
    @functools.wraps(fn)
    def wrapper(*args, confidence=None, **kwargs):
        if confidence is not None:
            if kwargs["difference"] != "top1" and not kwargs.get("top1"):
                raise click.UsageError("--confidence applies to top-1 agreement: give --difference top1 (or --top1)")
            kwargs["difference"] = f"top1@{confidence:g}"
        return fn(*args, **kwargs)
    return wrapper


def load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize):
    """Both models; MODEL_B may be a peft adapter folder, merged into a copy of MODEL_A."""
    from .loading import load_model
    kw = dict(arch_kwargs=arch_kwargs, trust=trust, normalize=normalize)
    a = load_model(model_a, arch=arch, **kw)
    return a, load_model(model_b, arch=arch_b or arch, base=a, **kw)


def check_region_options(vnnlib, center, eps, box):
    """Usage mistakes in the region options, before anything is loaded."""
    given = [name for name, v in (("--vnnlib", vnnlib), ("--center", center), ("--box", box)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one region: --vnnlib FILE, --center FILE --eps E, or --box LO HI"
                               + (f" (got {', '.join(given)})" if given else ""))
    if center and eps is None:
        raise click.UsageError("--center needs --eps E (the ball radius)")
    if box and box[0] > box[1]:
        raise click.UsageError(f"--box LO HI needs LO <= HI (got {box[0]:g} > {box[1]:g})")


def make_region(model_a, model_b, vnnlib, center, index, eps, norm, clip, box):
    import torch
    from .data import load_tensor
    from .graph import common_input_shape, input_shape_of
    from .regions import Box, ball, box_from_vnnlib
    if vnnlib:
        shapes = [s for s in (input_shape_of(model_a), input_shape_of(model_b)) if s]
        return box_from_vnnlib(vnnlib, math.prod(shapes[0]) if shapes else None)
    if box:
        shape = common_input_shape(model_a, model_b)
        return Box(torch.full(shape, box[0], dtype=torch.float64), torch.full(shape, box[1], dtype=torch.float64))
    points = load_tensor(center)
    # the file holds one point, or several (rows, picked by --index); the models say which
    given = [tuple(points.shape[1:]), tuple(points.shape)] if points.dim() >= 2 else [tuple(points.shape)]
    shape = common_input_shape(model_a, model_b, given)
    return ball(_point(points, shape, index, center).double(), eps, norm, clip)


def _point(points, shape, index, name):
    from .errors import RegionError
    n = math.prod(shape)
    if points.numel() % n or not 0 <= index < points.numel() // n:
        raise RegionError(f"{name} holds {points.numel()} values ({list(points.shape)}), not a whole number of "
                          f"inputs of shape {list(shape)}, or --index {index} is out of range")
    return points.reshape(-1, n)[index].reshape(shape)


def check_arithmetic(arithmetic, arithmetic_b):
    if arithmetic_b and (arithmetic == "exact") != (arithmetic_b == "exact"):
        raise click.UsageError("--arithmetic exact applies to both models: drop --arithmetic-b, or give both exact")


def check_threshold(threshold, difference):
    """A difference that cannot be negative has no use for a negative threshold."""
    if threshold is not None and threshold < 0 and difference not in ("top1", "dlr"):
        raise click.UsageError(f"--threshold {threshold:g} is negative, but the {difference} difference is "
                               "never negative; give a threshold >= 0")


def _is_npy(path):
    with open(path, "rb") as handle:
        return handle.read(6) == b"\x93NUMPY"


def _input_files(model_a, model_b, arch, arch_b, *others):
    """Files a run reads (so its --out may not be one of them)."""
    arch_files = [spec.rpartition(":")[0] for spec in (arch, arch_b) if spec and ".py:" in spec]
    return [model_a, model_b, *arch_files, *others]


def check_out(out, inputs, force, recognised=None):
    from .outputs import check_output, is_result
    if out:
        check_output(out, inputs, recognised or is_result, force)


def emit(result, as_json, text, to_mlflow=False):
    if to_mlflow:
        from .tracking import log_to_mlflow
        log_to_mlflow(result)
    click.echo(result.to_json() if as_json else text)


class _OneLineGroup(click.Group):
    """click, with its usage errors (exit 2) and its other refusals as one line on stderr instead
    of the usage block, and Ctrl-C during parsing as exit 130."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except SystemExit:
            _ignore_interrupts()  # a Ctrl-C while the interpreter shuts down changes nothing now
            raise
        except click.UsageError as exc:
            command = f" {exc.ctx.command_path.split(' ', 1)[1]}" if exc.ctx and " " in exc.ctx.command_path else ""
            _fail(f"diffprobe: usage: {exc.format_message()} (diffprobe{command} --help lists the options)", 2)
        except click.ClickException as exc:
            _fail(f"diffprobe: error: {exc.format_message()}", exc.exit_code)
        except click.exceptions.Abort:
            _fail("diffprobe: interrupted", 130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


@click.group(cls=_OneLineGroup)
@click.version_option(__version__, prog_name="diffprobe")
def main():
    """How differently can two neural networks behave? Witnesses by search, bounds by certification.

    Loading runs no code from a checkpoint unless --trust is given (pickled modules, .pt2);
    --arch and --trainer name Python code that is imported and run."""
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A Python warning on the command line: one line on stderr, not the source line it came from.
    torch's notices about its own deprecations (raised while loading quantised checkpoints) are
    not the user's concern and are dropped."""
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) or \
            _inside(filename, "torch") or _inside(filename, "torchao"):
        return
    click.echo(f"diffprobe: warning: {' '.join(str(message).split())}", err=True)


def _inside(filename, package):
    return f"{os.sep}site-packages{os.sep}{package}{os.sep}" in str(filename)


force_option = click.option("--force", is_flag=True, help="overwrite an existing --out file diffprobe did not write")


@main.command()
@model_options
@region_options
@common_options
@click.option("--steps", type=AT_LEAST_ONE, default=100, show_default=True)
@click.option("--restarts", type=AT_LEAST_ONE, default=8, show_default=True)
@click.option("--threshold", type=FINITE, help="stop early once exceeded; exit 10 if it is")
@click.option("--save-witness", type=click.Path(dir_okay=False), help="write the witness as .npy")
@click.option("--data", type=click.Path(exists=True),
              help="data file or folder: its points inside the region nearest a decision boundary start restarts")
@force_option
@_friendly
def search(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize, vnnlib, center, index, eps,
           norm, clip, box, difference, arithmetic, arithmetic_b, seed, device, as_json, quiet, to_mlflow, steps,
           restarts, threshold, save_witness, data, force):
    """Find the input in a region where MODEL_A and MODEL_B disagree most."""
    from . import search as run_search
    from .report import search_text
    check_region_options(vnnlib, center, eps, box)
    check_threshold(threshold, difference)
    check_arithmetic(arithmetic, arithmetic_b)
    check_out(save_witness, _input_files(model_a, model_b, arch, arch_b, center, vnnlib, data), force,
              _is_npy)
    a, b = load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize)
    region = make_region(a, b, vnnlib, center, index, eps, norm, clip, box)
    result = run_search(a, b, region, difference=difference, steps=steps, restarts=restarts, seed=seed,
                        threshold=threshold, data=data, arithmetic=arithmetic, arithmetic_b=arithmetic_b,
                        device=device, progress=not quiet)
    if save_witness:
        import io
        import numpy as np
        from .outputs import write_bytes
        buffer = io.BytesIO()
        np.save(buffer, result.witness().numpy())
        write_bytes(save_witness, buffer.getvalue())
    emit(result, as_json, search_text(result), to_mlflow)
    sys.exit(130 if result.interrupted else 10 if threshold is not None and result.found > threshold else 0)


def data_options(fn):
    return _options(
        click.option("--data", type=click.Path(exists=True), help="certify around every point of a data file or folder"),
        click.option("--labels", type=click.Path(dir_okay=False), help="labels for --data (else a 'y'/'labels' entry of it)"),
        click.option("--top1", is_flag=True, help="certify top-1 label agreement around each point (threshold 0)"),
        click.option("--jobs", type=AT_LEAST_ONE, default=1, show_default=True, help="worker processes for --data"),
        click.option("--out", type=click.Path(dir_okay=False), help="write the result as JSON here (with --data, "
                     "finished points also go to OUT's .jsonl while running)"),
        click.option("--resume", is_flag=True, help="continue the --data run recorded next to --out"),
        force_option,
    )(fn)


def _certify_command(name, doc, search_steps):
    @main.command(name=name, help=doc)
    @model_options
    @region_options
    @common_options
    @click.option("--method", type=_RegistryChoice(_methods), default="auto", show_default=True)
    @click.option("--threshold", type=FINITE, help="verdict: verified if bound <= T, falsified if a witness exceeds T")
    @click.option("--time-budget", type=POSITIVE,
                  help="seconds for branch-and-bound (per point with --data; off without it)")
    @data_options
    @_friendly
    def command(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize, vnnlib, center, index, eps,
                norm, clip, box, difference, arithmetic, arithmetic_b, seed, device, as_json, quiet, to_mlflow,
                method, threshold, time_budget, data, labels, top1, jobs, out, resume, force):
        check_threshold(threshold, difference)
        check_arithmetic(arithmetic, arithmetic_b)
        inputs = _input_files(model_a, model_b, arch, arch_b, center, vnnlib, data, labels)
        if data:
            _check_drift_options(threshold, top1, resume, out, force, inputs)
            a, b = load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize)
            return _drift(a, b, data, labels, eps, norm, clip, threshold, difference, top1, method,
                          time_budget, jobs, out, resume, seed, search_steps, as_json, quiet, to_mlflow,
                          arithmetic, arithmetic_b, device)
        if top1 or jobs > 1 or resume or labels:
            raise click.UsageError("--top1, --jobs, --labels and --resume work with --data FILE")
        check_region_options(vnnlib, center, eps, box)
        check_out(out, inputs, force)
        from . import certify
        from .report import certificate_text
        a, b = load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize)
        region = make_region(a, b, vnnlib, center, index, eps, norm, clip, box)
        result = certify(a, b, region, difference=difference, method=method, threshold=threshold,
                         time_budget=time_budget, seed=seed, search_steps=search_steps, arithmetic=arithmetic,
                         arithmetic_b=arithmetic_b, device=device, progress=not quiet)
        _save(result, out)
        emit(result, as_json, certificate_text(result), to_mlflow)
        sys.exit(130 if result.interrupted else EXIT[result.verdict and result.verdict.value])
    return command


def _check_drift_options(threshold, top1, resume, out, force, inputs):
    """Usage and output checks of a --data run, before it starts."""
    from .checkpoint import is_checkpoint
    from .outputs import check_output
    if resume and not out:
        raise click.UsageError("--resume needs --out FILE (the run to continue is recorded next to it)")
    if threshold is None and not top1:
        raise click.UsageError("--data needs --threshold T (or --top1)")
    check_out(out, inputs, force)
    if out:
        check_output(checkpoint_path(out), inputs, is_checkpoint, force)


def _drift(a, b, data, labels, eps, norm, clip, threshold, difference, top1, method, time_budget, jobs,
           out, resume, seed, search_steps, as_json, quiet, to_mlflow, arithmetic="native", arithmetic_b=None,
           device="cpu"):
    from . import drift
    from .data import load_tensor
    from .report import drift_text
    with process_pool(jobs) as executor:
        report = drift(a, b, data, labels=load_tensor(labels) if labels else None, eps=eps,
                       norm=norm, clip=clip, threshold=threshold, difference=difference, top1=top1,
                       method=method, time_budget_per_point=time_budget, executor=executor,
                       threads_per_job=max(1, (os.cpu_count() or 1) // jobs) if executor else 0,
                       search_steps=search_steps, seed=seed, checkpoint=checkpoint_path(out),
                       resume=resume, arithmetic=arithmetic, arithmetic_b=arithmetic_b, device=device,
                       progress=not quiet)
    _save(report, out)
    emit(report, as_json, drift_text(report), to_mlflow)
    if report.total > len(report.points):
        _fail(f"diffprobe: interrupted: {len(report.points)} of {report.total} points finished"
              + ("; the same command with --resume continues" if out else ""), 130)
    sys.exit(EXIT[report.verdict and report.verdict.value])


def _quiet_worker():
    """Worker processes leave Ctrl-C to the parent, which cancels their work and ends them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def process_pool(jobs):
    """A spawn process pool for --jobs N > 1 (workers import torch afresh rather than fork a
    threaded parent), else None; on the way out pending jobs are cancelled, and after Ctrl-C the
    workers are ended at once."""
    if jobs <= 1:
        yield None
        return
    import concurrent.futures
    import multiprocessing
    executor = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_quiet_worker)
    try:
        yield executor
    except KeyboardInterrupt:
        for process in list(getattr(executor, "_processes", {}).values()):  # no public way before 3.14
            process.terminate()
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        executor.shutdown(cancel_futures=True)


def checkpoint_path(out):
    """The JSON Lines record of finished points that sits next to --out."""
    if not out:
        return None
    from pathlib import Path
    return str(Path(out).with_suffix(".jsonl"))


def _save(result, out):
    if out:
        from .outputs import write_text
        write_text(out, result.to_json(indent=1))


@main.command()
@model_options
@region_options
@click.option("--data", type=click.Path(exists=True), help="data points: balls of radius --eps around the "
              "first --regions of them are certified, up to 512 of them are sampled")
@click.option("--regions", type=AT_LEAST_ONE, default=4, show_default=True, help="balls certified with --data")
@click.option("--difference", type=click.Choice(["elementwise", "probability"]), default="elementwise",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.option("--quiet", is_flag=True, help="no progress on stderr")
@click.option("--out", type=click.Path(dir_okay=False), help="write the result as JSON here")
@force_option
@_friendly
def layers(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize, vnnlib, center, index, eps, norm,
           clip, box, data, regions, difference, seed, as_json, quiet, out, force):
    """Which layer makes MODEL_B differ from MODEL_A? Per matching layer: sampled SQNR and max
    |delta| of its output, and the certified drift when only it (or all but it) differs."""
    from . import localize
    from .report import layers_text
    if data is None:
        check_region_options(vnnlib, center, eps, box)
    elif eps is None:
        raise click.UsageError("--data needs --eps E (the radius of the balls certified around its points)")
    check_out(out, _input_files(model_a, model_b, arch, arch_b, center, vnnlib, data), force)
    a, b = load_pair(model_a, model_b, arch, arch_b, arch_kwargs, trust, normalize)
    where = data if data else make_region(a, b, vnnlib, center, index, eps, norm, clip, box)
    result = localize(a, b, where, eps=eps, norm=norm, clip=clip, regions=regions, difference=difference,
                      seed=seed, progress=not quiet)
    _save(result, out)
    emit(result, as_json, layers_text(result))


_certify_command("certify", "Bound how much MODEL_A and MODEL_B can differ over a region.", 50)
_certify_command("compare", "Search and certify in one report, with a larger search budget.", 200)


@main.command()
@click.argument("query", type=click.Path(exists=True, dir_okay=False))
@click.argument("networks", nargs=-1, required=True)
@click.option("--timeout", type=POSITIVE, help="seconds for the whole answer, loading included")
@click.option("--result", "result_file", type=click.Path(dir_okay=False),
              help="write the answer here in VNN-COMP's result format (sat with the counterexample)")
@click.option("--out", type=click.Path(dir_okay=False), help="write the answer as JSON here")
@click.option("--arithmetic", type=click.Choice(["native", "exact"]), default="native", show_default=True,
              help="what the networks run in: native (as stored: float32 ONNX in float32) or exact")
@click.option("--trust", is_flag=True, help="allow network files that unpickle code")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@force_option
@_friendly
def solve(query, networks, timeout, result_file, out, arithmetic, trust, seed, as_json, force):
    """Answer a two-network VNN-LIB 2.0 QUERY: unsat (certified, exit 0), sat (a counterexample
    checked on the networks, exit 10), unknown or timeout (exit 5). NETWORKS: the two network
    files (f, then g), `NAME=PATH` pairs, or VNN-COMP's instances.csv field
    "[('f', 'f.onnx'), ('g', 'g.onnx')]"; one file serves both networks."""
    import dataclasses
    import time
    from .loading import load_model
    from ._solve import solve as run_solve
    from .vnnlib2 import confirmed_on_files, read_query, result_text
    from .outputs import is_result, write_text
    started = time.perf_counter()
    paths = _network_paths(networks)
    for target, recognised in ((result_file, _is_answer), (out, is_result)):
        check_out(target, [query, *paths.values()], force, recognised)
    parsed = read_query(query)
    files = _networks_of(parsed, paths)
    f, g = (load_model(p, trust=trust) for p in files)
    remaining = timeout - (time.perf_counter() - started) if timeout else None
    answer = run_solve(f, g, parsed, timeout=remaining, seed=seed, arithmetic=arithmetic)
    if answer.result == "sat" and not confirmed_on_files(files, parsed, answer.counterexample):
        answer = dataclasses.replace(answer, result="unknown", notes=answer.notes + [
            "the counterexample does not violate the query under onnx's reference evaluator"])
    if result_file:
        write_text(result_file, result_text(parsed, answer.result, answer.counterexample))
    if out:
        write_text(out, answer.to_json(indent=1))
    click.echo(answer.to_json() if as_json else answer.result)
    sys.exit({"unsat": 0, "sat": 10}.get(answer.result, 5))


def _network_paths(networks):
    """NAME -> path (names None: by position) from the NETWORKS arguments."""
    import ast
    if len(networks) == 1 and networks[0].lstrip().startswith("["):
        try:
            pairs = ast.literal_eval(networks[0])
            assert all(isinstance(n, str) and isinstance(p, str) for n, p in pairs)
        except (ValueError, SyntaxError, TypeError, AssertionError):
            raise click.UsageError(f"cannot read the networks field {networks[0][:80]!r}; give "
                                   "\"[('f', 'f.onnx'), ('g', 'g.onnx')]\" or the files themselves") from None
        return dict(pairs)
    if len(networks) > 2:
        raise click.UsageError(f"{len(networks)} networks given; a query compares two")
    named = [n.partition("=") if "=" in n else (None, "", n) for n in networks]
    return {name if name is not None else i: path for i, (name, _, path) in enumerate(named)}


def _networks_of(query, paths):
    """The files of the query's two networks, by name or else by position."""
    if len(paths) == 1:
        return [next(iter(paths.values()))] * 2
    by_name = [paths.get(name) for name in query.networks]
    if None not in by_name:
        return by_name
    return list(paths.values())[:2]


def _is_answer(path):
    """A VNN-COMP result file (diffprobe may overwrite it)."""
    with open(path, errors="replace") as handle:
        return handle.readline().strip() in ("", "sat", "unsat", "unknown", "timeout", "error")


@main.command()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eps", type=NON_NEGATIVE, default=0.02, show_default=True)
@click.option("--threshold", type=NON_NEGATIVE, default=3.0, show_default=True, help="allowed logit drift")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@_friendly
def demo(seed, eps, threshold, as_json, quiet):
    """Train a digits classifier and a fine-tuned copy, then search and certify their drift."""
    from diffprobe_examples.demo import demo_text, run_demo
    report = run_demo(seed=seed, eps=eps, threshold=threshold, progress=not quiet)
    click.echo(json.dumps(report["json"]) if as_json else demo_text(report))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default="report.html", show_default=True)
@force_option
@_friendly
def report(files, out, force):
    """Render saved results (--out JSON of search/certify/compare/stability, or a result's to_json())
    as one HTML page with figures; several drift reports at different eps also give the
    certified-bound-vs-eps curve."""
    from .outputs import is_report, write_text
    from .report import load_result, render
    check_out(out, files, force, is_report)
    results = [load_result(f) for f in files]
    write_text(out, render(results, files))
    click.echo(f"wrote {out}")


@main.command()
@click.option("--trainer", default="diffprobe_examples.trainers:digits", show_default=True,
              help="train(config) -> model, as module:function or path/file.py:function (runs that code)")
@click.option("--axes", default="seed,bootstrap,lr", show_default=True,
              help="comma-separated: seed, data_order, bootstrap, lr, momentum, or KEY=V1:V2:... for a config key of yours")
@click.option("--members", type=click.IntRange(min=2), default=4, show_default=True, help="members per axis")
@click.option("--base", "base_items", multiple=True, metavar="KEY=VALUE",
              help="the trainer's configuration the axes perturb (repeatable; default: the trainer's `defaults`)")
@click.option("--data", type=click.Path(exists=True), help="held-out inputs (default: the trainer's heldout())")
@click.option("--eps", type=NON_NEGATIVE, default=0.05, show_default=True, help="radius of the worst-case balls")
@click.option("--norm", type=click.Choice(["inf", "2"]), default="inf", show_default=True)
@click.option("--clip", type=FINITE, nargs=2, default=(0.0, 1.0), show_default=True)
@click.option("--regions", type=click.IntRange(min=0), default=5, show_default=True,
              help="held-out points with a worst-case ball (0: sampled distances only)")
@click.option("--rank-by", type=click.Choice(["kl", "js", "disagreement", "found", "certified"]), default="js", show_default=True)
@click.option("--jobs", type=AT_LEAST_ONE, default=1, show_default=True, help="worker processes for training")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="write the study as JSON; trained members go to OUT's .members folder")
@click.option("--resume", is_flag=True, help="reuse the members already trained for --out")
@force_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@_friendly
def stability(trainer, axes, members, base_items, data, eps, norm, clip, regions, rank_by, jobs, seed, out, resume,
              force, as_json, quiet):
    """How far apart do models trained with perturbed initial conditions land? Trains MEMBERS
    models per axis, measures pairwise distances, ranks the axes by spread."""
    from pathlib import Path
    from . import stability as run_study
    from .report import stability_text
    from ._stability import members_folder
    if resume and not out:
        raise click.UsageError("--resume needs --out FILE (the members are kept next to it)")
    axes, base = parse_axes(axes), parse_base(base_items)
    check_out(out, [data, trainer.rpartition(":")[0]], force)
    members_dir = members_folder(Path(out).with_suffix(".members"), fresh=not resume) if out else None
    with process_pool(jobs) as executor:
        study = run_study(trainer, axes=axes, members=members, base=base, heldout=data, eps=eps, norm=norm,
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
        raise click.UsageError("--axes names no axis; e.g. --axes seed,bootstrap,lr")
    return axes


def parse_base(items):
    """('lr=0.003', 'width=64') -> {'lr': 0.003, 'width': 64}."""
    base = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--base {item!r} must look like KEY=VALUE, e.g. --base lr=0.003")
        base[key.strip()] = _scalar(value)
    return base


def _scalar(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


if __name__ == "__main__":
    main()
