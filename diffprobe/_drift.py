"""Certified drift over a dataset: one region per data point, a verdict per point.

The work is cheapest-first: every point's region is bounded in one batch (regions stacked in the
batch dimension, the cheap method first and the stronger ones only where the threshold is not yet
met), the search runs only where the certificate fails, and branch-and-bound only for the points
still undecided, within a per-point budget. Chunks of points are independent jobs for any
`concurrent.futures.Executor`; finished points are appended to a JSON Lines checkpoint so an
interrupted run keeps its work and `resume=True` continues it.
"""
import concurrent.futures
import hashlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from .certification import BranchAndBound, bound_boxes, prepare, unbounded_notes, verdict_of
from .deployment import deploy, resolve_device
from .data import as_points
from .differences import get_difference
from .errors import DataError, RegionError
from .graph import common_input_shape
from .progress import progress_bar
from .regions import Region, ball
from .checkpoint import Checkpoint
from .results import DriftReport, PointResult, Verdict, provenance
from ._search import MASKING, search_pair



@dataclass(frozen=True)
class DriftSettings:
    """Everything a chunk job needs besides the models and regions (also the checkpoint header)."""

    difference: str
    threshold: Optional[float] = None
    method: str = "auto"
    time_budget: Optional[float] = None
    search_steps: int = 50
    search_restarts: int = 8
    seed: int = 0
    eps: Optional[float] = None
    norm: str = "inf"
    clip: Optional[List[float]] = None
    arithmetic: str = "native"
    arithmetic_b: Optional[str] = None


@dataclass
class Job:
    """A picklable unit of work: both models and a chunk of regions with their dataset indices."""

    model_a: object
    model_b: object
    regions: list
    indices: list
    settings: DriftSettings
    threads: int = 0
    done: frozenset = frozenset()  # indices already finished: bounded with the chunk, not run again
    device: Optional[str] = None  # where the search evaluates the models (not a setting: results match)


def drift(model_a: nn.Module, model_b: nn.Module, data: Union[str, Path, torch.Tensor, List[Region]], *,
          eps: Optional[float] = None, norm: Union[str, float] = "inf", threshold: Optional[float] = None,
          difference: str = "elementwise", top1: bool = False, labels: Optional[torch.Tensor] = None,
          method: str = "auto", time_budget_per_point: Optional[float] = None,
          clip: Optional[Tuple[float, float]] = None, executor: Optional[concurrent.futures.Executor] = None,
          chunk_size: int = 64, threads_per_job: int = 0, search_steps: int = 50, search_restarts: int = 8,
          seed: int = 0, checkpoint: Union[None, str, Path] = None, resume: bool = False,
          arithmetic: str = "native", arithmetic_b: Optional[str] = None, device: Optional[str] = None,
          progress: bool = False) -> DriftReport:
    """Certify, around every data point, that model_b's outputs stay within `threshold` of model_a's.

    `data`: a tensor/array of points [n, *input shape], a data file or folder (see
    `diffprobe.data.load_points`), or a list of regions (e.g. VNN-LIB boxes). With `eps`, each
    point becomes a ball of that radius (`norm` inf or 2, intersected with `clip`). `top1=True`
    certifies label agreement instead: the difference is the top-1 flip margin and the threshold
    defaults to 0. `executor`: any `concurrent.futures.Executor` (a process pool, Dask's
    `client.get_executor()`); chunks of `chunk_size` points are its jobs, each limited to
    `threads_per_job` torch threads when given (so parallel jobs do not oversubscribe cores). `checkpoint`: a JSON
    Lines file that receives each finished point; `resume=True` skips the points already in it.
    `arithmetic` / `arithmetic_b`: what the bounds cover (see `diffprobe.deployment`; default: the
    models as they run). `device`: where the search evaluates the models ('cpu', 'cuda', 'auto').
    Returns a `DriftReport`.
    """
    t0 = time.perf_counter()
    resolve_device(device)  # a device that is not there fails here, not in every job
    diff = get_difference(difference)
    if top1 and diff.bounded_as not in ("top1", "confident-top1"):  # delta-top-1 is top-1 agreement too
        diff = get_difference("top1")
    if threshold is None:
        threshold = diff.default_threshold
    points, labels, sources = as_points(data, labels)
    regions = _regions(model_a, model_b, points, eps, norm, clip)
    settings = DriftSettings(diff.name, threshold, method, time_budget_per_point, search_steps,
                             search_restarts, seed, eps, str(norm), list(clip) if clip else None,
                             arithmetic, arithmetic_b)
    record = Checkpoint(checkpoint, asdict(settings), len(regions), _fingerprint(regions))
    done = record.resume() if resume else {}
    record.start(done)
    # chunks are fixed ranges of the data, so a resumed run bounds every point in the same batch as
    # an uninterrupted one would (float64 sums depend on the batch) and gives the same answer
    chunks = [list(range(s, min(s + chunk_size, len(regions)))) for s in range(0, len(regions), chunk_size)]
    jobs = [Job(model_a, model_b, [regions[i] for i in chunk], chunk, settings, threads_per_job,
                frozenset(chunk) & frozenset(done), device) for chunk in chunks if not set(chunk) <= set(done)]
    records, notes = {i: PointResult.from_dict(r) for i, r in done.items()}, []
    with progress_bar(progress, len(regions), desc="drift") as bar:
        bar.update(len(done))

        def finished(points):  # each point is kept as soon as it is done
            record.append([p.to_dict() for p in points])
            records.update((p.index, p) for p in points)
            bar.update(len(points))
        try:
            _run(jobs, executor, finished)
        except KeyboardInterrupt:  # the point in progress is dropped, never recorded half done
            notes.append(f"interrupted: {len(records)} of {len(regions)} points finished"
                         + (f"; resume from {checkpoint}" if checkpoint else ""))
    labels_of = deploy(model_a, model_b, regions[:1], arithmetic, arithmetic_b).arithmetic
    return _report(regions, records, labels, sources, settings, notes, time.perf_counter() - t0, labels_of)


def _run(jobs, executor, finished):
    """Run the chunks, handing finished points to `finished`: point by point in this process,
    chunk by chunk through the executor."""
    if executor is None:
        for job in jobs:
            run_chunk(job, lambda point: finished([point]))
        return
    futures = [executor.submit(run_chunk, job) for job in jobs]
    try:
        for future in concurrent.futures.as_completed(futures):
            finished(future.result())
    finally:
        for future in futures:
            future.cancel()


def _regions(model_a, model_b, points, eps, norm, clip):
    if isinstance(points, list):
        return points
    if eps is None:
        raise RegionError("drift over data points needs eps (the radius of the ball around each point)")
    shape = common_input_shape(model_a, model_b, [tuple(points.shape[1:])])
    if points[0].numel() != math.prod(shape):
        raise DataError(f"data points have {points[0].numel()} values but the models take inputs of "
                        f"shape {list(shape)}; give data of shape [n, {', '.join(map(str, shape))}]")
    return [ball(p.reshape(shape), eps, norm, clip) for p in points]


def run_chunk(job, finished=None):
    """Per-point records for a chunk of regions (the executor's job function); `finished(record)`
    is called as each point is done."""
    if job.threads:
        torch.set_num_threads(job.threads)
    s = job.settings
    diff = get_difference(s.difference)
    # over many points, auto keeps to the cheap passes (an optimised one costs seconds per point:
    # mnistfc int8, 1,000 points, 9 s -> 72 s); method="alpha-differential" asks for it
    deployment, regions, spec, problem, methods = prepare(job.model_a, job.model_b, job.regions, diff, s.method,
                                                          False, s.arithmetic, s.arithmetic_b, job.device)
    skipped = [] if s.method == "auto" else None
    lower, upper, scores = _staged_bounds(problem, spec, methods, regions, s.threshold, skipped)
    with torch.no_grad():
        a, b = deployment.pair.outputs(torch.stack([r.center for r in regions]).to(torch.float64))
        at_center = torch.nan_to_num(diff(a, b), nan=float("inf"))
    notes = unbounded_notes(problem, s.method, methods, spec)[:0 if methods else 1] + sorted(set(skipped or []))
    classes = a.shape[1] > 1
    records = []
    for i, region in enumerate(regions):
        if job.indices[i] in job.done:
            continue
        t0 = time.perf_counter()
        initial = (lower[i:i + 1], upper[i:i + 1], scores[i:i + 1])
        outcome = _point(deployment, diff, problem, spec.take([i]), methods, region, initial,
                         at_center[i].item(), s)
        record = PointResult(**{**outcome, "notes": notes + outcome["notes"],
                                "seconds": outcome["seconds"] + time.perf_counter() - t0},
                             index=job.indices[i], label_a=int(a[i].argmax()) if classes else None,
                             label_b=int(b[i].argmax()) if classes else None)
        records.append(record)
        if finished is not None:
            finished(record)
    return records


def _staged_bounds(problem, spec, methods, regions, threshold, skipped=None):
    """Per-row bounds of every region, each method run only on the regions not yet verified.
    Boxes and L-inf balls go in one batch, and so do L2 balls of one radius and clip (their
    centres stacked); any other mix is bounded one region per call."""
    batch = type(regions[0]).stacked(regions)
    if batch is not None:
        return _staged_batch(problem, spec, methods, batch, *_boxes(regions), threshold, skipped=skipped)
    parts = [_staged_batch(problem, spec.take([i]), methods, r, *_boxes([r]), threshold, skipped=skipped)
             for i, r in enumerate(regions)]
    return tuple(torch.cat(t) for t in zip(*parts))


def _boxes(regions):
    return (torch.stack([r.bounding_box()[0] for r in regions]),
            torch.stack([r.bounding_box()[1] for r in regions]))


def _staged_batch(problem, spec, methods, region, lo, hi, threshold, skipped=None):
    """`region`: the regions stacked (`Region.stacked`), one per box."""
    lower = upper = scores = None
    for name in methods:
        todo = torch.arange(len(lo)) if scores is None or threshold is None else (scores > threshold).nonzero().reshape(-1)
        if not len(todo):
            break
        part = region.take(todo)
        within = None if lower is None else (lower[todo], upper[todo])
        l, u, _ = bound_boxes(problem, spec.take(todo), [name], part, lo[todo], hi[todo], within=within,
                              skipped=skipped)
        if lower is None:
            lower, upper = l, u
        else:
            lower[todo], upper[todo] = l, u
        scores = spec.scalar(lower, upper)
    if lower is None:  # no method (the deployed arithmetic cannot be bounded): unbounded
        return bound_boxes(problem, spec, [], region, lo, hi)
    return lower, upper, scores


def _point(deployment, diff, problem, spec, methods, region, initial, at_center, s):
    """One point's outcome (the fields of its `PointResult` but where it is in the data): its
    single-pass bound, then search and branch-and-bound only if undecided."""
    t0 = time.perf_counter()
    bound = initial[2].item()
    record = {"bound": bound, "found": at_center, "witness": None, "branches": 1, "notes": []}
    if s.threshold is not None and bound <= s.threshold and at_center <= s.threshold:
        record.update(verdict=verdict_of(bound, at_center, s.threshold), seconds=time.perf_counter() - t0)
        return record
    witness = search_pair(deployment.search_pair, diff, region, surrogate=deployment.search_surrogate,
                          steps=s.search_steps, restarts=s.search_restarts, seed=s.seed, threshold=s.threshold)
    if witness.interrupted:  # a verdict the interrupt changed is never recorded
        raise KeyboardInterrupt
    state = BranchAndBound(problem, spec, methods, region, diff, witness, initial, auto=s.method == "auto")
    if s.time_budget and region.is_box and methods:
        state.run(time.perf_counter() + s.time_budget, s.threshold, 0.05, False)
        if state.interrupted:
            raise KeyboardInterrupt
    cert = state.certificate("", s.threshold, s.seed, 0.0)
    record.update(bound=cert.bound, found=cert.found, witness=cert.witness, branches=cert.branches,
                  notes=cert.notes, verdict=cert.verdict, seconds=time.perf_counter() - t0,
                  gradient_masked=witness.gradient_masked)
    return record


def _fingerprint(regions):
    """A digest of the regions, so a resumed run cannot mix results for other data."""
    digest = hashlib.sha256()
    for r in regions:
        for t in r.bounding_box():
            digest.update(t.to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _overall(counts, total, threshold):
    if threshold is None:
        return None
    if counts["falsified"]:
        return Verdict.FALSIFIED
    return Verdict.VERIFIED if counts["verified"] == total else Verdict.UNKNOWN


def _report(regions, records, labels, sources, settings, notes, seconds, arithmetic):
    points = [replace(records[i], source=sources[i] if sources is not None else None,
                      label=int(labels[i]) if labels is not None else None) for i in sorted(records)]
    counts = {v.value: sum(p.verdict == v for p in points) for v in Verdict}
    masked = sum(bool(p.gradient_masked) for p in points)
    if masked:
        notes = notes + [f"gradient-free search beat the gradient search on {masked} points: {MASKING}"]
    done = len(points)
    accuracy = lambda key: (sum(getattr(p, key) == p.label for p in points) / done) if labels is not None and done else None
    return DriftReport(
        difference=settings.difference, eps=settings.eps, norm=settings.norm, threshold=settings.threshold,
        method=settings.method, points=points, counts=counts, total=len(regions),
        bound=max((p.bound for p in points), default=None),
        found=max((p.found for p in points), default=None),
        verdict=_overall(counts, len(regions), settings.threshold),
        accuracy_a=accuracy("label_a"), accuracy_b=accuracy("label_b"),
        agreement=(sum(p.label_a == p.label_b for p in points) / done
                   if done and points[0].label_a is not None else None),
        input_shape=list(regions[0].shape), seconds=seconds, notes=notes,
        provenance=provenance(settings.seed, torch_dtype="float64"), arithmetic=arithmetic)
