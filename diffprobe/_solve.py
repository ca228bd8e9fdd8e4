"""`solve`: answer a two-network VNN-LIB 2.0 query — `sat` with a counterexample checked on the
models as they run, `unsat` with a certificate, else `unknown` or `timeout`.

Each input box is first searched for a violation (a witness of the query's own margin, then the
certificate's witness), then certified on the output difference D = model_g - model_f with the
differential engine and branch-and-bound until the query's atoms are refuted or time runs out.
"""
import math
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .certification import certify
from .deployment import deploy
from .differences import Difference
from .graph import common_input_shape
from .errors import ShapeMismatchError
from .regions import Box
from .results import QueryResult, provenance
from ._search import search
from .vnnlib2 import Query, read_query

def solve(model_f: nn.Module, model_g: nn.Module, query: Union[Query, str, Path], *,
          timeout: Optional[float] = None, seed: int = 0, arithmetic: str = "native") -> QueryResult:
    """The answer to a two-network query (a `Query`, or a VNN-LIB 2.0 file): `sat` when an input
    in its region meets the violation on the models as they run (`arithmetic`, see
    `diffprobe.deployment`), `unsat` when certified bounds refute it, else `unknown` (the bounds
    are too loose) or `timeout` (`timeout` seconds ran out)."""
    t0 = time.perf_counter()
    query = read_query(query) if isinstance(query, (str, Path)) else query
    _check_shapes(model_f, model_g, query)
    deadline = t0 + timeout if timeout else math.inf
    bounds, notes, method, answer = [], [], None, "unsat"
    for i, box in enumerate(query.boxes):
        share = (deadline - time.perf_counter()) / (len(query.boxes) - i)
        outcome = _solve_box(model_f, model_g, query, box, share, seed, arithmetic)
        bounds.append(outcome["bound"])
        method = outcome.get("method", method)
        notes += outcome["notes"]
        if outcome["answer"] == "sat":
            return _result("sat", query, bounds, outcome["counterexample"], t0, notes, method, seed)
        if outcome["answer"] != "unsat":
            answer = "timeout" if time.perf_counter() >= deadline - 1.0 else "unknown"
    return _result(answer, query, bounds, None, t0, notes, method, seed)


def _check_shapes(model_f, model_g, query):
    shape = common_input_shape(model_f, model_g, [query.input_shape])
    if math.prod(shape) != math.prod(query.input_shape):
        raise ShapeMismatchError(f"the query declares inputs of shape {list(query.input_shape)} but the networks "
                                 f"take {list(shape)}")


def _solve_box(model_f, model_g, query, box, seconds, seed, arithmetic):
    """One box: its answer, the certified bound of max |D|, a counterexample when sat."""
    t0 = time.perf_counter()
    pair = deploy(model_f, model_g, [box], arithmetic).pair  # what a counterexample is checked on
    with warnings.catch_warnings():  # masking notes and the like go into the answer's notes
        warnings.simplefilter("ignore")
        witness = search(model_f, model_g, box, difference=_violation(query), steps=60, restarts=8, seed=seed,
                         threshold=0.0, arithmetic=arithmetic)
        found = _counterexample(pair, query, box, witness.x)
        if found is not None:
            return {"answer": "sat", "counterexample": found, "bound": None, "notes": []}
        budget = max(seconds - (time.perf_counter() - t0), 0.5)
        # tolerance 0: a gap within 5 % of the bound decides nothing when the threshold lies inside it
        cert = certify(model_f, model_g, box, threshold=query.uniform_threshold(), time_budget=budget,
                       tolerance=0.0, seed=seed, arithmetic=arithmetic)
    outcome = {"bound": cert.bound, "method": cert.method, "notes": list(cert.notes)}
    lower, upper = torch.tensor(cert.lower, dtype=torch.float64), torch.tensor(cert.upper, dtype=torch.float64)
    if query.refuted(lower, upper):
        return {**outcome, "answer": "unsat"}
    found = _counterexample(pair, query, box, cert.witness) if cert.witness else None
    if found is not None:
        return {**outcome, "answer": "sat", "counterexample": found}
    return {**outcome, "answer": "unknown"}


def _violation(query):
    """The query's violation margin as a difference the search ascends (> 0: a counterexample)."""
    return Difference("violation", "the query's violation margin (> 0 violates)",
                      lambda a, b: query.margin(b.flatten(1) - a.flatten(1)).unsqueeze(1),
                      lambda v: v[:, 0], None)


def _counterexample(pair, query, box, x):
    """`x` rounded to a float32 input inside `box`, and the models' outputs there, if the models
    as they run (`pair`) violate the query at it; else None."""
    point = _float32_inside(torch.as_tensor(x, dtype=torch.float64).reshape(-1), box)
    with torch.no_grad():
        out_f, out_g = pair.outputs(point.reshape(1, *pair.input_shape))
    d = out_g.flatten(1).to(torch.float64) - out_f.flatten(1).to(torch.float64)
    if not bool(query.violated(d)[0]):
        return None
    return {"input": point.tolist(), "output_f": out_f.flatten().tolist(), "output_g": out_g.flatten().tolist(),
            "margin": query.margin(d)[0].item()}


def _float32_inside(x, box: Box):
    """The float32 values nearest `x` that lie inside the box (the checker reads float32 inputs)."""
    lo, hi = box.bounding_box()
    x32 = x.clamp(lo, hi).to(torch.float32)
    up, down = torch.tensor(math.inf, dtype=torch.float32), torch.tensor(-math.inf, dtype=torch.float32)
    x32 = torch.where(x32.to(torch.float64) < lo, torch.nextafter(x32, up), x32)
    x32 = torch.where(x32.to(torch.float64) > hi, torch.nextafter(x32, down), x32)
    return x32.to(torch.float64)


def _result(answer, query, bounds, counterexample, t0, notes, method, seed):
    covered = len(bounds) == len(query.boxes) and None not in bounds
    return QueryResult(result=answer, networks=list(query.networks), boxes=len(query.boxes),
                       bound=max(bounds) if covered else math.inf,
                       counterexample=counterexample, method=method, seconds=time.perf_counter() - t0,
                       notes=list(dict.fromkeys(notes)), provenance=provenance(seed))
