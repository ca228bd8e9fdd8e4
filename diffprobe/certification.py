"""Certified bounds on how much two models can differ over a region, with input-split
branch-and-bound that tightens the bound while a search raises the witness below it."""
import copy
import dataclasses
import math
import time
from typing import Optional, Union

import torch
from torch import nn

from .arithmetic import outward
from .bounds import ON_LOWERED_CHAINS, METHODS, build_problem, differential_engine
from .deployment import deploy
from .differences import Difference, get_difference, is_probability
from .errors import DiffprobeError, UnsupportedOperationError
from .graph import fit_region
from .layers import Network
from .regions import Region
from .results import Certificate, Verdict, provenance
from .progress import progress_bar
from ._search import search_pair, warn_masking

_INF = float("inf")


class Spec:
    """How a difference is bounded: the graph kind, the spec rows (None: the graph's outputs), and
    the scalar summary per box from per-row bounds. The difference itself (elementwise or
    probability): rows are its outputs, the summary max |.|; other kinds subclass it."""

    rows = None

    def __init__(self, difference, pair, centers):
        self.kind = self.graph_kind = difference.bounded_as

    def take(self, index):
        """The spec of a subset of the regions."""
        spec = copy.copy(self)
        if self.rows is not None and self.rows.dim() == 3:
            spec.rows = self.rows[index]
        return spec

    def scalar(self, lower, upper):
        """The certified bound of the summary per box, from per-row bounds [n, rows]."""
        return torch.maximum(-lower, upper).amax(dim=1)

    def reported(self, lower, upper):
        """The per-row bounds a certificate reports."""
        return lower, upper


def _margin_rows(k, labels):
    """Rows m_j - m_y for j != y, one block per label y in `labels` [len, k - 1, k]."""
    eye = torch.eye(k, dtype=torch.float64)
    return torch.stack([eye[[j for j in range(k) if j != y]] - eye[y] for y in labels])


def _stacked(rows_a, rows_b):
    """Rows over both models' outputs [a | b] from rows over model_a's and over model_b's."""
    return torch.cat([torch.cat([rows_a, torch.zeros_like(rows_a)], -1),
                      torch.cat([torch.zeros_like(rows_b), rows_b], -1)], -2)


class Top1Spec(Spec):
    """Top-1 flips against model_a's label at each region's centre: rows per region
    ([n, rows, 2k] over both models' outputs) — model_a's margins, model_b's margins, and all of
    model_b's pairwise differences; one traced graph serves every label."""

    def __init__(self, difference, pair, centers):
        super().__init__(difference, pair, centers)
        with torch.no_grad():
            a, _ = pair.outputs(centers.to(torch.float64))
        k, labels = a.shape[1], a.argmax(dim=1)
        margins = _margin_rows(k, range(k))
        pairs = margins.reshape(-1, k)
        model_b_pairs = torch.cat([torch.zeros_like(pairs), pairs], 1)
        rows = torch.stack([torch.cat([_stacked(m, m), model_b_pairs]) for m in margins])
        self.graph_kind, self.k, self.rows = "stacked", k, rows[labels]

    def scalar(self, lower, upper):
        m = self.k - 1
        a_keeps = upper[:, :m].amax(dim=1) < 0
        # if model_a provably keeps label y, the flip margin is at most max_j b_j - b_y;
        # otherwise only the largest pairwise difference of model_b bounds it
        return torch.where(a_keeps, upper[:, m:2 * m].amax(dim=1), upper[:, 2 * m:].amax(dim=1))

    def reported(self, lower, upper):
        return lower[:, self.k - 1:2 * (self.k - 1)], upper[:, self.k - 1:2 * (self.k - 1)]


class ConfidentTop1Spec(Spec):
    """delta-top-1: rows a_j - a_y and b_j - b_y for every label y (the same for every region). A
    label y can be model_a's confident one somewhere in a box only if the log-odds
    log((1-delta)/delta) - log sum_j exp(a_j - a_y) can reach 0 (its upper bound uses the lower
    bounds of a_j - a_y); where it can, model_b must keep y (max_j b_j - b_y < 0). The summary
    max_y min(log-odds bound, flip bound) is <= 0 when no confident label of model_a flips."""

    def __init__(self, difference, pair, centers):
        super().__init__(difference, pair, centers)
        with torch.no_grad():
            a, _ = pair.outputs(centers[:1].to(torch.float64))
        if bool(is_probability(a.reshape(1, -1)).all()):
            raise UnsupportedOperationError(
                ["a Softmax output"], what="delta-top-1 certification",
                hint="its bounds read model_a's confidence from logits; give the models without their final "
                     "Softmax (search still finds confident flips)")
        self.k = k = a.shape[1]
        margins = _margin_rows(k, range(k)).reshape(-1, k)  # label y's block: rows y (k-1) .. y (k-1) + k - 2
        self.graph_kind, self.rows = "stacked", _stacked(margins, margins)
        self.log_odds = math.log((1 - difference.confidence) / difference.confidence)

    def scalar(self, lower, upper):
        n, k, half = len(lower), self.k, self.rows.shape[0] // 2
        a_low = lower[:, :half].reshape(n, k, k - 1)
        confident = self.log_odds - torch.logsumexp(a_low, dim=2)  # upper bound of the log-odds, per label
        flips = upper[:, half:].reshape(n, k, k - 1).amax(dim=2)
        return torch.minimum(confident, flips).amax(dim=1)


SPECS = {"top1": Top1Spec, "confident-top1": ConfidentTop1Spec}


def spec_for(difference, pair, centers):
    """The spec of `difference` over regions with these centres."""
    if difference.bounded_as is None:
        raise UnsupportedOperationError(
            [difference.name], what="certification",
            hint="it is not certifiable with bound propagation; certify 'elementwise' or "
                 "'probability' instead, or use search for a lower bound")
    return SPECS.get(difference.bounded_as, Spec)(difference, pair, centers)


def bound_boxes(problem, spec, methods, region, lo, hi, enough=-_INF, ran=None, within=None, skipped=None):
    """Per-row bounds of a batch of boxes: the intersection over `methods` (each is sound) and
    `within` (bounds already known to hold for these boxes), the methods run in order until every
    box's scalar bound is at most `enough`; their names go to `ran`. With a `skipped` list, a
    method that fails on the graph is noted there and the next one runs; without, it raises."""
    if spec.rows is not None:
        problem = dataclasses.replace(problem, spec=spec.rows)
    lower, upper = within if within is not None else (None, None)
    # under auto, interval propagation is the last resort when every linear method failed on the graph
    last_resort = ["ibp"] if skipped is not None and "ibp" not in methods and methods else []
    for name in [*methods, *last_resort]:
        if name in last_resort and lower is not None:
            break
        try:
            l, u = _method_bounds(problem, name, region, lo, hi)
        except UnsupportedOperationError as exc:
            if skipped is None:
                raise
            skipped.append(f"{name} skipped: {exc}")
            continue
        if ran is not None:
            ran.append(name)
        lower = l if lower is None else torch.maximum(lower, l)
        upper = u if upper is None else torch.minimum(upper, u)
        if spec.kind == "probability":  # a difference of probabilities lies in [-1, 1] whatever the method
            lower, upper = lower.clamp(-1.0, 1.0), upper.clamp(-1.0, 1.0)
        if bool((spec.scalar(lower, upper) <= enough).all()):
            break
    if lower is None:  # nothing could bound these boxes
        rows = spec.rows.shape[-2] if spec.rows is not None else problem.outputs
        lower = torch.full((len(lo), rows), -_INF, dtype=torch.float64)
        upper = torch.full_like(lower, _INF)
    return lower, upper, spec.scalar(lower, upper)


def _bounds(problem, name, region, lo, hi):
    """One method's bounds, rounded outward, and widened by the models' rounding where the graph is
    their exact formula (deployed float models whose lowered chains auto_LiRPA cannot take; the
    differential methods bound those chains, error terms included, and need no widening)."""
    lower, upper = outward(*METHODS[name](problem, region, lo, hi), problem.scale)
    if problem.margin is not None and name not in ON_LOWERED_CHAINS:
        margin = problem.margin.rows(lo, hi, problem.spec)
        lower, upper = lower - margin, upper + margin
    return lower, upper


def _method_bounds(problem, name, region, lo, hi):
    """`_bounds`; for probabilities also from the logits. Along the segment from model_a's logits z
    to model_b's z + D, row i of softmax's Jacobian applied to D is p_i (D_i - sum_j p_j D_j), at
    most p_i (1 - p_i) times the range of D: so each probability moves by at most that range (the
    logit differences, bounded by `name` itself, with the differential engine's cancellation where
    it applies) times the largest p_i (1 - p_i) over both models' logit bounds (at most 1/4)."""
    if problem.logits is None:
        return _bounds(problem, name, region, lo, hi)
    low, high = _bounds(problem.logits, name, region, lo, hi)
    spread = high.amax(1, keepdim=True) - low.amin(1, keepdim=True)
    width = torch.nan_to_num(spread * _softmax_slope(problem, name, region, lo, hi), nan=1.0).clamp_max(1.0)
    try:
        lower, upper = _bounds(problem, name, region, lo, hi)
    except UnsupportedOperationError:  # the differential method has no probability graph of its own
        return -width, width
    return torch.maximum(lower, -width), torch.minimum(upper, width)


def _softmax_slope(problem, name, region, lo, hi):
    """Per output, the largest p (1 - p) of its probability anywhere between the two models' logits
    (their bounds' hull); 1/4 where they cannot be bounded."""
    quarter = torch.full((len(lo), problem.outputs), 0.25, dtype=torch.float64)
    try:
        both = _bounds(problem.both, name if name in ("ibp", "crown", "alpha-crown") else "crown", region, lo, hi)
    except UnsupportedOperationError:
        return quarter
    k = problem.outputs
    z_lo = torch.minimum(both[0][:, :k], both[0][:, k:])
    z_hi = torch.maximum(both[1][:, :k], both[1][:, k:])
    if not bool(torch.isfinite(z_lo).all() and torch.isfinite(z_hi).all()):
        return quarter
    # softmax_i is increasing in z_i and decreasing in the others (shifted by the largest bound: no overflow)
    top = z_hi.amax(1, keepdim=True)
    e_lo, e_hi = torch.exp(z_lo - top), torch.exp(z_hi - top)
    p_lo = e_lo / (e_lo + e_hi.sum(1, keepdim=True) - e_hi)
    p_hi = e_hi / (e_hi + e_lo.sum(1, keepdim=True) - e_lo)
    slope = torch.maximum(p_lo * (1 - p_lo), p_hi * (1 - p_hi))
    slope = torch.where((p_lo <= 0.5) & (p_hi >= 0.5), quarter, slope)
    return slope * (1 + 1e-9) + 1e-300  # rounding of the exponentials above


METHOD_NAMES = ["auto", *METHODS]


def methods_for(method, problem, optimise):
    """`auto`: CROWN, plus the differential bounds when the two layer structures match (the
    intersection is never looser than either), plus with `optimise` an optimised pass
    (alpha-differential, else alpha-CROWN) for small problems. Cheapest first, so a caller with a
    threshold can stop once a box is verified (alpha-differential always comes after the plain
    differential pass). None at all when the deployed arithmetic cannot be bounded."""
    if method == "auto":
        engine = differential_engine(problem.logits or problem)
        if problem.graph is None:  # no composed graph for the models as they run
            return [] if engine is None else ["differential"]
        small = optimise and sum(p.numel() for p in problem.graph.pair.parameters()) <= 200_000
        if engine is None:
            return ["crown", "alpha-crown"] if small else ["crown"]
        # alpha-CROWN's cost grows with the neurons (a CNN's: many); it tightens the engine's
        # layers only in a plain ReLU chain, else it runs on the composed graph
        if optimise and engine.relu_chain and engine.hidden <= 1024:
            return ["differential", "crown", "alpha-differential"]
        return ["differential", "crown"] + (["alpha-crown"] if small and not engine.relu_chain else [])
    if method == "alpha-differential":
        return ["differential", "alpha-differential"]
    if method not in METHODS:
        raise DiffprobeError(f"unknown method '{method}'; choose one of {', '.join(['auto', *METHODS])}")
    return [method]


def verdict_of(bound, found, threshold):
    if threshold is None:
        return None
    if found > threshold:
        return Verdict.FALSIFIED
    return Verdict.VERIFIED if bound <= threshold else Verdict.UNKNOWN


def certify(model_a: nn.Module, model_b: nn.Module, region: Region, *,
            difference: Union[str, Difference] = "elementwise", method: str = "auto",
            threshold: Optional[float] = None, time_budget: Optional[float] = None, tolerance: float = 0.05,
            search_steps: int = 50, search_restarts: int = 8, seed: int = 0, arithmetic: str = "native",
            arithmetic_b: Optional[str] = None, device: Optional[str] = None, progress: bool = False) -> Certificate:
    """Certified bounds on `difference` between the models over `region`, with a witness.

    `method`: ibp, crown, alpha-crown, differential, alpha-differential or auto. With
    `time_budget` (seconds), input-split branch-and-bound runs until the gap (bound - found) is
    within `tolerance` of the bound, the verdict against `threshold` is reached, or the budget is
    spent. `arithmetic` (for model_b `arithmetic_b` when it differs): what the bound covers, see
    `diffprobe.deployment` — by default each model as it runs (fp16 in fp16, int8 as int8); the
    witness is always evaluated on the models as they run. Bounds are computed in float64 on the
    CPU and rounded outward; an unbounded one (overflow, NaN) is +inf and never verifies. `device`:
    where the search evaluates the models ('cpu', 'cuda', 'auto').
    """
    t0 = time.perf_counter()
    diff = get_difference(difference)
    if threshold is None:  # label agreement: the certificate's threshold is 0
        threshold = diff.default_threshold
    # branch-and-bound's many cheap passes beat one optimised pass: optimise single passes only
    deployment, (region,), spec, problem, methods = prepare(model_a, model_b, [region], diff, method,
                                                            not time_budget, arithmetic, arithmetic_b, device)
    witness = search_pair(deployment.search_pair, diff, region, surrogate=deployment.search_surrogate,
                          steps=search_steps, restarts=search_restarts, seed=seed, threshold=threshold)
    if witness.interrupted:  # nothing is certified yet: stop at once
        raise KeyboardInterrupt
    warn_masking(witness)
    # the costlier methods run only while they can change the answer: until the bound reaches the
    # threshold (when the witness does not exceed it), else until the gap is within tolerance
    enough = (threshold if threshold is not None and witness.found <= threshold
              else witness.found / (1 - tolerance))
    state = BranchAndBound(problem, spec, methods, region, diff, witness, enough=enough, auto=method == "auto")
    state.notes += unbounded_notes(problem, method, methods, spec)
    if time_budget and region.is_box and methods:
        state.run(t0 + time_budget, threshold, tolerance, progress)
    return state.certificate(method if method != "auto" else "auto(" + "+".join(state.ran) + ")",
                             threshold, seed, time.perf_counter() - t0)


def unbounded_notes(problem, method, methods, spec):
    """What the user needs to know about how (or whether) the deployed models were bounded."""
    if not methods:
        return [f"no certified bound for the models as they run ({problem.why_unbounded}); the verdict "
                "rests on the witness alone; arithmetic 'exact' bounds the stored weights in exact arithmetic"]
    if method == "auto" and problem.graph is None:
        return [f"bounded by the differential method alone: the composed graph cannot bound the models as "
                f"they run ({problem.why_unbounded})"]
    if method == "auto" and spec.kind == "elementwise" and "differential" not in methods:
        return ["the two layer structures do not match (or are not affine/ReLU chains): bounded on the "
                "composed graph, without the differential method"]
    return []


def logits_of(model):
    """A chain ending in Softmax over its outputs without that Softmax (an exported classifier,
    VeryDiff's jet-tagging networks), else the model itself."""
    if isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[-1], nn.Softmax) \
            and model[-1].dim in (-1, 1, None):
        layers = list(model)[:-1]
        return Network(layers, model.input_shape) if isinstance(model, Network) else nn.Sequential(*layers)
    return model


def prepare(model_a, model_b, regions, diff, method, optimise, arithmetic="native", arithmetic_b=None, device=None):
    """What bounding needs, shared by `certify` and `drift`: the models as they run, the regions in
    their input shape, their spec, the problem and the methods to run (cheapest first)."""
    if diff.bounded_as in ("top1", "confident-top1"):  # labels and confidence read the same on logits
        model_a, model_b = logits_of(model_a), logits_of(model_b)
    deployment = deploy(model_a, model_b, regions, arithmetic, arithmetic_b, device)
    regions = [fit_region(r, deployment.pair.input_shape) for r in regions]
    spec = spec_for(diff, deployment.pair, torch.stack([r.center for r in regions]))
    problem = build_problem(deployment, spec.graph_kind)
    if spec.kind == "probability":  # probabilities are bounded from the logits too
        problem.logits = build_problem(deployment, "elementwise")
        problem.both = build_problem(deployment, "stacked")
    with torch.no_grad():
        a, b = deployment.pair.outputs(torch.stack([r.center for r in regions]))
    # the magnitudes a bound is computed from (for rounding it outward); inf if a model overflows
    scale = float(torch.nan_to_num(torch.cat([a, b], 1).abs(), nan=_INF).max()) + 1.0
    for part in filter(None, (problem, problem.logits, problem.both)):
        part.outputs, part.scale = a.shape[1], scale
    if method not in ("auto", *ON_LOWERED_CHAINS) and problem.graph is None:
        problem.module  # raises the one-line reason
    return deployment, regions, spec, problem, methods_for(method, problem, optimise)


INPUT_SPLIT_MAX_DIMS = 8  # halving one input at a time shrinks a box of more dimensions too slowly


class BranchAndBound:
    """Leaves of the input split; the bound is the max over leaves (and pruned leaves)."""

    def __init__(self, problem, spec, methods, region, diff, witness, initial=None, enough=-_INF, auto=True):
        self.problem, self.spec, self.methods, self.region = problem, spec, methods, region
        self.skipped = [] if auto else None  # under `auto` a method that fails is skipped with a note
        self.pair, self.surrogate, self.diff = problem.deployment.pair, problem.deployment.surrogate, diff
        self.found, self.witness = witness.found, torch.tensor(witness.x, dtype=torch.float64)
        self.gradient_masked = witness.gradient_masked
        self.notes = list(witness.warnings)
        lo, hi = region.bounding_box()
        self.lo, self.hi = lo.unsqueeze(0), hi.unsqueeze(0)
        self.ran = []  # the methods that bounded the region
        self.lower, self.upper, self.scores = initial or bound_boxes(problem, spec, methods, region, self.lo,
                                                                      self.hi, enough, self.ran, skipped=self.skipped)
        self.pruned_lower = torch.full_like(self.lower[0], _INF)
        self.pruned_upper = torch.full_like(self.upper[0], -_INF)
        self.pruned_max, self.branches = -_INF, 1
        self.per_split = None  # seconds per split in the last step
        self.layers = None  # per open box, the engine's pre-activation bounds (see `_layers_after`)
        self.interrupted = False
        self.engine = differential_engine(problem) if "differential" in methods else None
        self.sensitivity = (None if self.engine is None else
                            sum(w.abs().sum(0) for w in self.engine.first_weights))
        if not region.is_box:
            self.notes.append("L2 regions are bounded in one pass (ball bound intersected with the "
                              "bounding-box bound); no branch-and-bound")

    @property
    def bound(self):
        worst = self.scores.max().item() if len(self.scores) else -_INF
        return _INF if math.isnan(worst) else max(self.pruned_max, worst)

    def _prune(self, level):
        drop = self.scores <= level
        if drop.any():
            self.pruned_max = max(self.pruned_max, self.scores[drop].max().item())
            self.pruned_lower = torch.minimum(self.pruned_lower, self.lower[drop].amin(0))
            self.pruned_upper = torch.maximum(self.pruned_upper, self.upper[drop].amax(0))
            keep = ~drop
            self.lo, self.hi, self.lower, self.upper, self.scores = (
                t[keep] for t in (self.lo, self.hi, self.lower, self.upper, self.scores))
            self.layers = None if self.layers is None else [tuple(t[keep] for t in layer) for layer in self.layers]

    def _split_dims(self, lo, hi):
        """Per box the input dimension to halve: for matching chains the one that widens the
        first layer's pre-activation intervals most (width times that column's weight mass in
        both models; on the ACAS property-1 box this reaches a 45x smaller bound in 30 s than the
        gradient score, whose value at a box centre is noise for a near-identical pair; splitting
        by |input coefficient| of the box's worst bounded row times width instead left boxes wide
        where neurons are unstable: 6x fewer branches in 60 s, and a looser bound, on ACAS N_2_3);
        otherwise width times |gradient of the difference| at the centre."""
        x = (lo + hi) / 2
        with torch.no_grad():
            self._raise_witness(x, self.diff(*self.pair.outputs(x)))
        width = (hi - lo).reshape(len(lo), -1)
        if self.sensitivity is not None:
            score = width * self.sensitivity
        elif self.surrogate is not None:
            x = x.clone().requires_grad_(True)
            grad, = torch.autograd.grad(self.diff(*self.surrogate.outputs(x)).sum(), x)
            score = grad.abs().reshape(len(lo), -1) * width
            score = torch.where(score.amax(1, keepdim=True) > 0, score, width)
        else:
            score = width
        return score.argmax(dim=1)

    def _raise_witness(self, x, values):
        values = torch.nan_to_num(values, nan=_INF)  # a deployed model that outputs NaN differs without bound
        best = int(values.argmax())
        if values[best].item() > self.found:
            self.found, self.witness = values[best].item(), x[best].reshape(-1)

    def _step(self, batch):
        order = self.scores.argsort(descending=True)[:batch]
        lo, hi = self.lo[order], self.hi[order]
        dims = self._split_dims(lo, hi)
        rows = torch.arange(len(lo))
        mid = ((lo + hi) / 2).reshape(len(lo), -1)[rows, dims]
        left_hi, right_lo = hi.clone().reshape(len(lo), -1), lo.clone().reshape(len(lo), -1)
        left_hi[rows, dims], right_lo[rows, dims] = mid, mid
        new_lo = torch.cat([lo, right_lo.reshape(lo.shape)])
        new_hi = torch.cat([left_hi.reshape(hi.shape), hi])
        # on sub-regions the differential bound alone (when available) is the cheap, tight one
        methods = ["differential"] if "differential" in self.methods else self.methods
        # a child lies inside its parent, so the parent's bounds hold for it too (a relaxation is
        # not monotone in the box: without this a split could loosen the bound)
        parent = (self.lower[order].repeat(2, 1), self.upper[order].repeat(2, 1))
        self.problem.parent_layers = (None if self.layers is None else
                                      [tuple(t[order].repeat(2, 1) for t in layer) for layer in self.layers])
        if self.engine is not None:
            self.engine.layer_bounds = None
        try:
            lower, upper, scores = bound_boxes(self.problem, self.spec, methods, self.region, new_lo, new_hi,
                                               within=parent, skipped=self.skipped)
        finally:
            self.problem.parent_layers = None
        keep = torch.ones(len(self.scores), dtype=torch.bool)
        keep[order] = False
        self.layers = self._layers_after(keep, len(new_lo))
        self.lo, self.hi = torch.cat([self.lo[keep], new_lo]), torch.cat([self.hi[keep], new_hi])
        self.lower, self.upper = torch.cat([self.lower[keep], lower]), torch.cat([self.upper[keep], upper])
        self.scores = torch.cat([self.scores[keep], scores])
        self.branches += len(new_lo)

    def _layers_after(self, keep, count):
        """Per open box, the differential engine's pre-activation bounds: the kept boxes' (or none
        known: infinite) and the `count` new boxes' from the pass that just bounded them; None when
        that pass did not run. Children start from their parents' bounds: neurons a parent had
        stable need no refinement in its children (fewer back-substitutions per branch)."""
        fresh = None if self.engine is None else self.engine.layer_bounds
        if fresh is None or len(fresh[0][0]) != count:
            return None
        if self.layers is None:
            infinite = lambda t: torch.full((int(keep.sum()), t.shape[1]), math.inf, dtype=t.dtype)
            kept = [(-infinite(l), infinite(u), -infinite(lp), infinite(up)) for l, u, lp, up in fresh]
        else:
            kept = [tuple(t[keep] for t in layer) for layer in self.layers]
        return [tuple(torch.cat([k, f]) for k, f in zip(old, new)) for old, new in zip(kept, fresh)]

    def _batch(self, level):
        """How many sub-regions to split at once: those whose bound is within the top fifth between
        the pruning level and the worst bound (only they move the result), at least 8, at most 256.
        Measured on the ACAS property-1 box: 0.018 after 30 s, vs 0.026 splitting a fixed 64."""
        worst = self.scores.max()
        return int(min(256, max(8, int((self.scores > level + 0.8 * (worst - level)).sum()))))

    def _level(self, threshold):
        """Sub-regions bounded at or below this cannot change the answer: the witness, or the
        threshold when that is higher."""
        return self.found if threshold is None else max(self.found, threshold)

    def _optimise_root(self, level, deadline):
        """On a high-dimensional region input splitting gains little: spend the budget on the
        optimised differential pass first (mnistfc vs W(1+0.01N), L-inf 0.03, 10 s: 0.220 with
        input splitting alone, 0.175 with this pass) when it fits in the remaining budget (its
        cost on this problem so far, 2 s before the first: auto_LiRPA's overhead alone is about a
        second, so on digits with 0.5 s per point splitting decides more)."""
        if (self.engine is None or not self.engine.relu_chain or self.lo[0].numel() <= INPUT_SPLIT_MAX_DIMS
                or len(self.scores) != 1 or "alpha-differential" in self.ran or self.scores[0] <= level):
            return
        started = time.perf_counter()
        if deadline - started < (self.problem.alpha_seconds or 2.0):
            return
        self.lower, self.upper, self.scores = bound_boxes(self.problem, self.spec, ["alpha-differential"],
                                                          self.region, self.lo, self.hi, ran=self.ran,
                                                          within=(self.lower, self.upper), skipped=self.skipped)
        self.problem.alpha_seconds = time.perf_counter() - started

    def run(self, deadline, threshold, tolerance, progress, max_leaves=200_000):
        with progress_bar(progress, None, desc="branch-and-bound") as bar:
            try:
                self._optimise_root(self._level(threshold), deadline)
                while time.perf_counter() < deadline:
                    self._prune(self._level(threshold))
                    if not len(self.scores) or (threshold is not None and self.found > threshold):
                        break
                    if math.isfinite(self.bound) and self.bound - self.found <= tolerance * abs(self.bound):
                        break
                    if len(self.scores) > max_leaves:
                        self.notes.append(f"stopped at {max_leaves} open sub-regions")
                        break
                    started = time.perf_counter()
                    batch = self._batch(self._level(threshold))
                    if self.per_split:  # keep a step inside the remaining budget
                        batch = max(1, min(batch, int((deadline - started) / self.per_split)))
                    else:  # the first step measures what a split costs: a small one
                        batch = min(batch, 2)
                    self._step(batch)
                    self.per_split = (time.perf_counter() - started) / batch
                    bar.update(1)
            except KeyboardInterrupt:
                self.notes.append("interrupted: the bound so far is reported")
                self.interrupted = True

    def certificate(self, method, threshold, seed, seconds):
        lower = torch.minimum(self.lower.amin(0), self.pruned_lower) if len(self.scores) else self.pruned_lower
        upper = torch.maximum(self.upper.amax(0), self.pruned_upper) if len(self.scores) else self.pruned_upper
        lower, upper = self.spec.reported(lower.unsqueeze(0), upper.unsqueeze(0))
        bound, notes = self.bound, self.notes + sorted(set(self.skipped or []))
        if self.found > bound:
            # a deployed model's output above its certified bound: the error model missed something.
            # Never report such a bound (it would verify falsely); please report it as a bug
            notes.append(f"internal check failed: the witness ({self.found:.6g}) exceeds the computed bound "
                         f"({bound:.6g}); the bound is withdrawn. Please report this")
            bound, lower, upper = _INF, torch.full_like(lower, -_INF), torch.full_like(upper, _INF)
        if bound == _INF and not any("unbounded" in n for n in notes):
            notes.append("the certified bound is unbounded (+inf, written as null in JSON): overflow, NaN, "
                         "or no method could bound the models as they run")
        if self.spec.kind == "probability" and bound >= 1.0:
            notes.append("the bound is the trivial one (two probabilities differ by at most 1): it says nothing")
        gap = self.found / bound if 0 < bound < _INF and self.found > 0 else (1.0 if bound == self.found else 0.0)
        return Certificate(
            difference=self.diff.name, method=method, lower=lower[0].tolist(), upper=upper[0].tolist(),
            bound=bound, found=self.found, gap_ratio=gap, verdict=verdict_of(bound, self.found, threshold),
            threshold=threshold, seconds=seconds, seed=seed, witness=self.witness.tolist(),
            branches=self.branches, region=self.region.to_dict(), notes=notes,
            provenance=provenance(seed, torch_dtype="float64"), arithmetic=self.problem.deployment.arithmetic,
            interrupted=self.interrupted)
