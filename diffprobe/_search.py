"""Disagreement search: APGD-style input optimisation for the input where two models differ most.

The schedule follows AutoAttack's APGD (Croce & Hein 2020): momentum 0.75, a first step of twice
the radius, the step halved at checkpoints (the first at 22 % of the budget, then shrinking by 3 %
to a 6 % floor) when at most 75 % of the recent steps improved or nothing improved since the last
halving, restarting from the best point; exact projection onto the region (ball ∩ box).
Restarts run batched. A gradient-free random search takes over when the gradients are zero or
the ascent gains nothing in its first tenth of the steps.
"""
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .data import as_points
from .differences import Difference, get_difference
from .objectives import Objective, as_objective
from .errors import DataError, RegionError
from .deployment import deploy
from .graph import fit_region
from .progress import progress_bar
from .regions import Region
from .results import SearchResult, provenance


def _checkpoints(steps):
    p, prev, points = 0.22, 0.0, []
    while p < 1:
        points.append(int(round(p * steps)))
        p, prev = p + max(p - prev - 0.03, 0.06), p
    return set(points)


def starting_points(region, n, generator, starts=None):
    """The region centre, points on the surface or corners, random points, and given `starts`."""
    center = region.center.unsqueeze(0)
    given = region.project(starts.to(torch.float64).reshape(-1, *region.shape)) if starts is not None else center[:0]
    rest = max(n - 1 - len(given), 0)
    return torch.cat([center, given, region.corners(rest // 3, generator),
                      region.sample(rest - rest // 3, generator)])[:max(n, 1)]


class _Evaluator:
    """Disagreement of a batch on the models as they run, counting every point evaluated; gradients
    go through `surrogate` (the exact float64 pair; None: no gradients, the gradient-free search
    does the work), values always through `pair`.

    For max-|.| summaries each restart may ascend one signed output (`target`), a smooth piece
    of the non-smooth maximum; the value tracked is always the full difference.
    """

    def __init__(self, pair, difference, surrogate=None):
        self.pair, self.surrogate, self.count, self.target = pair, surrogate, 0, None
        # a plain difference may be targeted output by output; a combined objective is taken whole
        self.difference = difference if isinstance(difference, Difference) else None
        self.objective = as_objective(difference)

    def __call__(self, x):
        self.count += x.shape[0]
        return _nan_is_worst(self.objective(*self.pair.outputs(x), x))

    def aim(self, x):
        """Fix each restart's target. Even restarts ascend one signed output: the one with the
        largest |difference| at their start, except every fourth from the third on, which take the
        next signed outputs ranked by the highest value they reach at any start (APGD-T's point: the
        output that differs most at the starts is not always the one that can differ most; an MNIST
        fp16 pair in an L2 ball: 5.46e-4 -> 5.82e-4). Odd restarts ascend the full (non-smooth)
        maximum, so a wrong early choice of output cannot lock the whole search in."""
        if self.difference is None or not self.difference.per_output_max:
            return
        with torch.no_grad():
            per_output = self.difference.per_output(*self.pair.outputs(x))
        k = per_output.abs().argmax(dim=1)
        sign = per_output.gather(1, k[:, None]).sign().squeeze(1)
        outputs = per_output.shape[1]
        ranked = torch.cat([per_output, -per_output], dim=1).amax(dim=0).argsort(descending=True)
        for j, row in enumerate(range(2, len(k), 4)):
            target = int(ranked[(j + 1) % len(ranked)])
            k[row], sign[row] = target % outputs, 1.0 if target < outputs else -1.0
        sign[1::2] = 0
        self.target = (k, sign)

    def value_and_grad(self, x):
        x = x.detach().requires_grad_(True)
        self.count += x.shape[0]
        if self.surrogate is None:
            with torch.no_grad():
                return _nan_is_worst(self.objective(*self.pair.outputs(x), x)), torch.zeros_like(x)
        if self.target is None:
            values = objective = self.objective(*self.surrogate.outputs(x), x)
        else:
            per_output = self.difference.per_output(*self.surrogate.outputs(x))
            values = self.difference.reduce(per_output)
            k, sign = self.target
            objective = torch.where(sign != 0, per_output.gather(1, k[:, None]).squeeze(1) * sign, values)
        grad, = torch.autograd.grad(objective.sum(), x)
        if self.surrogate is not self.pair:  # the value is what the deployed models give
            with torch.no_grad():
                values = self.objective(*self.pair.outputs(x), x)
        # a NaN gradient (a user objective's 0/0) would freeze every step; treat it as flat
        return _nan_is_worst(values.detach()), torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def near_boundary(self, region, points, keep):
        """The `keep` data points inside the region closest to a decision boundary: the smallest
        top-1 margin (top output minus the runner-up) of either model; for single-output models,
        the largest difference. Each point ranked counts as an evaluation."""
        if points[0].numel() != region.center.numel():
            raise DataError(f"data points have {points[0].numel()} values each; the models take "
                            f"{region.center.numel()} ({tuple(region.shape)}): give data of the models' input shape")
        points = points.reshape(-1, *region.shape).to(torch.float64)
        points = points[region.contains(points)]
        if not len(points):
            return points
        self.count += len(points)
        with torch.no_grad():
            a, b = self.pair.outputs(points)
            if a[0].numel() < 2:
                order = self.objective(a, b, points).argsort(descending=True)
            else:
                order = torch.minimum(_top1_margin(a), _top1_margin(b)).argsort()
        return points[order[:keep]]

    def screen(self, region, n, keep, generator, batch=4096):
        """The `keep` best of n random points (forward passes only)."""
        points, values = [], []
        with torch.no_grad():
            for start in range(0, n, batch):
                x = region.sample(min(batch, n - start), generator)
                points.append(x)
                values.append(self(x))
        if not points:  # no screening budget
            return region.center.unsqueeze(0)[:0].to(torch.float64)
        points, values = torch.cat(points), torch.cat(values)
        return points[values.argsort(descending=True)[:keep]]


def _nan_is_worst(values):
    """A deployed model that outputs NaN (an overflow) disagrees without bound there."""
    return torch.nan_to_num(values, nan=float("inf"))


def _top1_margin(outputs):
    top2 = outputs.reshape(len(outputs), -1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def _apgd(evaluate, region, x0, steps, threshold, progress, generator, reserve):
    """Batched APGD; returns best points, best values, the trace of the overall best and the
    number of steps taken.

    The ascent gives up at its first check (a tenth of the steps) when it has not raised the best
    start by 0.1 %, and at once when every gradient is zero: on a near-identical pair of deep
    networks over a low-dimensional box (ACAS Xu vs its fp16 copy) the difference is a field of
    narrow spikes that gradients do not point to, and the rest of the budget is better spent by
    the gradient-free search (property-1 box: 1.3e-5 -> 1.7e-5 median over 10 seeds).

    A restart that has already had its step halved and has not improved for one check (two
    above 32 input dimensions; a check every tenth of the steps) has converged to a local
    maximum: its best point is archived and it starts again from the next `reserve` point
    (screened candidates, best first) or a fresh random one, so on jagged landscapes (quantised
    copies, low-dimensional inputs) the budget buys many short ascents instead of a few stuck ones."""
    dtype = x0.dtype
    scale = region.step_scale(dtype)
    eta = torch.full((x0.shape[0],) + (1,) * (x0.dim() - 1), 2.0, dtype=dtype)
    x = x0.clone()
    value, grad = evaluate.value_and_grad(x)
    best_x, best = x.clone(), value.clone()
    x_prev, trace = x.clone(), [best.max().item()]
    checkpoints, last_cp, improved = _checkpoints(steps), 0, torch.zeros_like(best)
    best_at_cp, eta_at_cp = best.clone(), eta.clone()
    if bool((grad == 0).all()):
        return best_x, best, trace, 0
    archive, check_every, best_at_check = [], max(5, steps // 10), best.clone()
    stale = torch.zeros(len(best), dtype=torch.long)
    # a few input dimensions: ascents converge fast and fresh starts pay (tiny int8 pairs 0.72 -> 0.98
    # of the MILP optimum); many: a restart stalled once may still climb (mnistfc int8 falls below
    # PGD when reseeded that early), so it must stall twice
    stale_checks = 1 if x0[0].numel() <= 32 else 2
    for step in range(1, steps + 1):
        z = region.project(x + eta * scale * region.ascent(grad))
        alpha = 0.75 if step > 1 else 1.0
        x_new = region.project(x + alpha * (z - x) + (1 - alpha) * (x - x_prev))
        x_prev = x
        value, grad = evaluate.value_and_grad(x_new)
        better = value > best
        improved += better.to(dtype)
        best = torch.where(better, value, best)
        best_x[better] = x_new[better].detach()
        x = x_new.detach()
        trace.append(max(trace[-1], best.max().item()))  # restarts reset rows; the archive keeps their best
        progress(1)
        if threshold is not None and trace[-1] > threshold:
            break
        if step == check_every and trace[-1] <= trace[0] + 1e-3 * abs(trace[0]):
            break
        if step in checkpoints:
            too_few = improved <= 0.75 * (step - last_cp)
            stalled = (eta.reshape(-1) == eta_at_cp.reshape(-1)) & (best <= best_at_cp)
            halve = (too_few | stalled).reshape(eta.shape)
            eta_at_cp, best_at_cp = eta.clone(), best.clone()
            eta = torch.where(halve, eta / 2, eta)
            x = torch.where(halve, best_x, x)
            if bool(halve.any()):
                value, grad = evaluate.value_and_grad(x)
            improved.zero_()
            last_cp = step
        if step % check_every == 0 and step < steps:
            stale = torch.where(best <= best_at_check, stale + 1, torch.zeros_like(stale))
            converged = (eta.reshape(-1) < 2.0) & (stale >= stale_checks)
            stale[converged] = 0
            if bool(converged.any()):
                archive.append((best_x[converged].clone(), best[converged].clone()))
                need = int(converged.sum())
                fresh = torch.cat([reserve[:need].to(dtype), region.sample(max(need - len(reserve), 0), generator).to(dtype)])
                reserve = reserve[need:]
                x[converged], x_prev[converged], eta[converged] = fresh, fresh, 2.0
                eta_at_cp[converged] = 2.0
                value, grad = evaluate.value_and_grad(x)
                best = torch.where(converged, value, best)
                best_at_cp = torch.where(converged, value, best_at_cp)
                best_x[converged] = x[converged]
            best_at_check = best.clone()
    for kept_x, kept in archive:
        best_x, best = torch.cat([best_x, kept_x]), torch.cat([best, kept])
    return best_x, best, trace, step


def _random_search(evaluate, region, best_x, best, budget, generator, threshold=None, batch=64):
    """Gradient-free: mutate the best point with shrinking noise, keep what improves (Square/DFlare
    spirit), stop once past `threshold`; also useful to notice gradient masking."""
    trace, radius, spent = [], 0.5, 0
    x_best, v_best = best_x[best.argmax()].unsqueeze(0), best.max()
    while spent < budget:
        n = min(batch, budget - spent)
        cand = region.project(x_best + radius * region.mutation(n, generator))
        with torch.no_grad():
            values = evaluate(cand.to(x_best.dtype))
        spent += n
        if values.max() > v_best:
            v_best, x_best = values.max(), cand[values.argmax()].unsqueeze(0).to(x_best.dtype)
        else:
            radius = max(radius * 0.7, 1e-4)
        trace.append(v_best.item())
        if threshold is not None and trace[-1] > threshold:
            break
    return x_best, v_best, trace


def search(model_a: nn.Module, model_b: nn.Module, region: Region, *,
           difference: Union[str, Difference, Objective] = "elementwise", steps: int = 100, restarts: int = 8,
           seed: int = 0, threshold: Optional[float] = None, starts: Optional[torch.Tensor] = None,
           data: Union[None, str, Path, torch.Tensor] = None, random_fraction: float = 0.1,
           screen_fraction: float = 0.2, arithmetic: str = "native", arithmetic_b: Optional[str] = None,
           device: Optional[str] = None, progress: bool = False) -> SearchResult:
    """The input in `region` where model_a and model_b disagree most (by `difference`: a registered
    name, a `Difference`, or an `Objective` such as `flip(3, 8) - 0.1 * tv()`).

    Returns a `SearchResult` whose witness is re-evaluated on the real models in float64 and lies
    inside the region. `threshold` stops early once exceeded (falsification); `starts` adds
    starting points; `data` (points [n, *input shape], or a data file or folder) adds the points
    inside the region nearest a decision boundary (smallest top-1 margin of either model);
    `screen_fraction` of the budget screens random points for good starts and `random_fraction`
    goes to a gradient-free search afterwards, which also takes what the gradient ascent leaves
    when it gains nothing (zero or uninformative gradients). The models are evaluated as they run
    under `arithmetic` (see `diffprobe.deployment`; default: as loaded, an fp16 module in fp16),
    so the witness is an input on which the deployed models differ by `found`. `device`: where the
    models are evaluated ('cpu', 'cuda', 'auto'; copies are moved there, inputs and outputs stay on
    the CPU).
    """
    if steps < 1 or restarts < 1:
        raise RegionError(f"steps and restarts must be >= 1 (got {steps}, {restarts})")
    deployment = deploy(model_a, model_b, [region], arithmetic, arithmetic_b, device)
    result = search_pair(deployment.search_pair, objective_of(difference),
                         fit_region(region, deployment.pair.input_shape), surrogate=deployment.search_surrogate,
                         steps=steps, restarts=restarts, seed=seed, threshold=threshold, starts=starts,
                         data=_data_points(data), random_fraction=random_fraction,
                         screen_fraction=screen_fraction, progress=progress)
    result = dataclasses.replace(result, arithmetic=deployment.arithmetic)
    warn_masking(result)
    return result


def _data_points(data):
    if data is None:
        return None
    points = as_points(data)[0]
    if isinstance(points, list):
        raise DataError("search starts from data points; give an array file (or a folder of them), not VNN-LIB regions")
    return points


MASKING = "gradients may be masked (rounded or quantised model)"


def warn_masking(result, stacklevel=3):
    """The public entry points (search, certify) raise the masking note as a Python warning too;
    internal callers (drift over many points) keep it in the result only."""
    if result.gradient_masked:
        warnings.warn(next(n for n in result.warnings if n.endswith(MASKING)), stacklevel=stacklevel)


def objective_of(difference):
    """A registered difference by name, or a Difference / Objective as given."""
    return difference if isinstance(difference, (Difference, Objective)) else get_difference(difference)


def search_pair(pair, diff, region, *, steps, restarts, seed, surrogate=None, threshold=None, starts=None,
                data=None, random_fraction=0.1, screen_fraction=0.2, progress=False):
    """`search` on an already composed pair (evaluated as it runs; gradients through `surrogate`)
    and a region in its input shape."""
    t0 = time.perf_counter()
    evaluate = _Evaluator(pair, diff, surrogate)
    generator = torch.Generator().manual_seed(seed)
    screened = evaluate.screen(region, int(screen_fraction * steps * restarts), 4 * restarts, generator)
    # the best screened points start half the restarts; the next ones wait to reseed converged restarts
    screened, reserve = screened[:restarts // 2], screened[restarts // 2:]
    given = [] if starts is None else [starts.reshape(-1, *region.shape).double()]
    if data is not None:
        given.append(evaluate.near_boundary(region, data, restarts // 2))
    starts = torch.cat(given + [screened])
    x0 = starting_points(region, restarts, generator, starts)
    evaluate.aim(x0)
    notes, trace, masked = [], [], False
    with progress_bar(progress, steps) as bar:
        try:
            best_x, best, trace, taken = _apgd(evaluate, region, x0, steps, threshold, bar.update, generator,
                                               reserve)
            bar.update(steps - taken)
            zero_grad = taken == 0
            budget = int(random_fraction * steps * restarts) + (steps - taken) * restarts
            if zero_grad:
                notes.append("gradients were zero at every start; used gradient-free search")
            elif taken < steps and (threshold is None or max(trace) <= threshold):
                notes.append(f"the gradient ascent gained nothing in {taken} steps; the rest of its budget "
                             "went to the gradient-free search")
            if budget and (threshold is None or max(trace) <= threshold):
                rx, rv, rtrace = _random_search(evaluate, region, best_x, best, budget, generator, threshold)
                if rv > best.max() + 1e-12 * max(1.0, abs(best.max().item())) and not zero_grad:
                    masked = True
                    notes.append(f"gradient-free search beat the gradient search ({rv.item():.4g} > "
                                 f"{best.max().item():.4g}): {MASKING}")
                best_x, best = torch.cat([best_x, rx]), torch.cat([best, rv.reshape(1)])
                trace += [max(trace[-1], v) for v in rtrace]
        except KeyboardInterrupt:
            notes.append("interrupted before the search finished: the best starting point is reported")
            result = witness_result(pair, diff, region, x0[0], evaluate.count, seed, trace,
                                    time.perf_counter() - t0, notes)
            return dataclasses.replace(result, interrupted=True)
    result = witness_result(pair, diff, region, best_x[best.argmax()], evaluate.count, seed,
                            trace, time.perf_counter() - t0, notes)
    return dataclasses.replace(result, gradient_masked=masked)


def witness_result(pair, diff, region, x, count, seed, trace, seconds, notes):
    """Re-check the witness on the models as they run, inside the region."""
    x = region.project(x.detach().to(torch.float64).unsqueeze(0))
    assert bool(region.contains(x, tol=0)), "projection left the region"
    with torch.no_grad():
        a, b = pair.outputs(x)
        found = _nan_is_worst(as_objective(diff)(a, b, x)).item()
    return SearchResult(
        difference=diff.name, found=found, x=x.reshape(-1).tolist(), input_shape=list(region.shape),
        output_a=a.reshape(-1).tolist(), output_b=b.reshape(-1).tolist(), evaluations=count,
        seed=seed, trace=trace, seconds=seconds, region=region.to_dict(), warnings=notes,
        provenance=provenance(seed), arithmetic=_arithmetic_of(pair))


def _arithmetic_of(pair):
    from .deployment import describe
    return {"model_a": describe(pair.model_a, "native"), "model_b": describe(pair.model_b, "native")}
