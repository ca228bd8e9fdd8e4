"""VNN-LIB 2.0 queries over two networks, read with the official `vnnlib` parser and mapped to
what diffprobe bounds.

A query asserts the *violation*: it is `sat` when some input meets every assertion. diffprobe
answers queries of this shape (the one VNN-COMP 2026's differential benchmarks use):

- two networks f and g (`isomorphic-to`, `equal-to` or declared alone), one input and one output
  each, with g's input tied element by element to f's (`(== X[0,i] X2[0,i])`): one shared input;
- input assertions that bound f's (or g's) input elements: a box, or a disjunction of boxes;
- output assertions that compare linear functions of the output difference D = Y_g - Y_f with
  constants, under any and/or nesting (read in disjunctive normal form): the violation is a
  disjunction of conjunctions of atoms `w . D > t` (or `>=`).

Anything else (hidden-node constraints, one-network queries, outputs of one network alone, a
comparison mixing inputs and outputs, `==` or `!=` on outputs) is refused with one line naming it.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import RegionError
from .regions import Box, vnnlib_text

_INF = float("inf")


@dataclass(frozen=True)
class Atom:
    """One comparison of the violation: `weights . D > threshold` (`>=` when not strict), D the
    flattened output difference Y_g - Y_f."""

    weights: torch.Tensor
    threshold: float
    strict: bool

    def margin(self, d: torch.Tensor) -> torch.Tensor:
        """How far each row of `d` [n, k] goes past the threshold (> 0, or >= 0, violates)."""
        return d @ self.weights.to(d.dtype) - self.threshold

    def holds(self, d: torch.Tensor) -> torch.Tensor:
        m = self.margin(d)
        return m > 0 if self.strict else m >= 0

    def refuted(self, lower: torch.Tensor, upper: torch.Tensor) -> bool:
        """Whether no D in the per-output box [lower, upper] meets the atom."""
        w = self.weights.to(torch.float64)
        top = torch.where(w > 0, w * upper, w * lower).nan_to_num(nan=_INF).sum().item()
        return top <= self.threshold if self.strict else top < self.threshold

    def radius(self) -> float:
        """For a single-output atom: the largest t such that |D_i| <= t refutes it, in the float64
        arithmetic `refuted` uses."""
        scale = abs(self.weights[self.single_output()].item())
        t = self.threshold / scale
        while scale * t > self.threshold or (not self.strict and scale * t >= self.threshold):
            t = math.nextafter(t, -_INF)
        return t

    def single_output(self) -> Optional[int]:
        """The output this atom bounds when it reads `s * D_i > t` (s > 0 or < 0), else None."""
        nonzero = self.weights.nonzero().reshape(-1)
        return int(nonzero[0]) if len(nonzero) == 1 else None


@dataclass(frozen=True)
class Query:
    """A two-network VNN-LIB 2.0 query as regions and a violation."""

    networks: Tuple[str, str]
    input_shape: Tuple[int, ...]  # as declared (f's input)
    output_shape: Tuple[int, ...]
    boxes: List[Box]  # the input region: a disjunction of boxes
    violation: List[List[Atom]]  # a disjunction of conjunctions of atoms over D
    congruence: Optional[str] = None  # "isomorphic-to", "equal-to" or None
    names: Tuple[str, str, str, str] = ("X", "Y", "X2", "Y2")  # f's input and output, g's input and output

    def margin(self, d: torch.Tensor) -> torch.Tensor:
        """Per row of `d`: the largest over conjuncts of the smallest atom margin; > 0 violates."""
        per_conjunct = [torch.stack([a.margin(d) for a in conjunct]).amin(dim=0) for conjunct in self.violation]
        return torch.stack(per_conjunct).amax(dim=0)

    def violated(self, d: torch.Tensor) -> torch.Tensor:
        """Per row of `d`: whether it meets every atom of some conjunct."""
        return torch.stack([torch.stack([a.holds(d) for a in conjunct]).all(dim=0)
                            for conjunct in self.violation]).any(dim=0)

    def refuted(self, lower: torch.Tensor, upper: torch.Tensor) -> bool:
        """Whether per-output bounds of D rule out every conjunct (one refuted atom each)."""
        return all(any(a.refuted(lower, upper) for a in conjunct) for conjunct in self.violation)

    def uniform_threshold(self) -> Optional[float]:
        """The largest t with max_i |D_i| <= t refuting every conjunct through one of its
        single-output atoms, or None when some conjunct has none (a certificate's per-output
        bounds then decide)."""
        best = []
        for conjunct in self.violation:
            options = [a.radius() for a in conjunct if a.single_output() is not None and a.threshold > 0]
            if not options:
                return None
            best.append(max(options))
        return min(best)


def result_text(query: Query, answer: str, counterexample: Optional[dict] = None) -> str:
    """The answer as VNN-COMP's result file: `unsat`, `unknown`, `timeout`, or `sat` followed by
    the counterexample, one `(NAME[i,j] value)` per input and output element of both networks."""
    if answer != "sat" or counterexample is None:
        return answer + "\n"
    x_f, y_f, x_g, y_g = query.names
    pairs = [(x_f, query.input_shape, counterexample["input"]), (x_g, query.input_shape, counterexample["input"]),
             (y_f, query.output_shape, counterexample["output_f"]), (y_g, query.output_shape, counterexample["output_g"])]
    lines = [f"({name}[{','.join(map(str, np.unravel_index(i, shape)))}] {float(v)!r})"
             for name, shape, values in pairs for i, v in enumerate(values)]
    return "sat\n(" + "\n ".join(lines) + ")\n"


def confirmed_on_files(files, query: Query, counterexample: dict) -> bool:
    """Whether the counterexample violates the query when ONNX networks run in onnx's own
    reference evaluator (independent of diffprobe's import of them); True for other formats,
    which `solve` checked on the loaded modules."""
    from .loading import onnx_proto, sniff_format
    from .onnx_import import graph_input
    if not all(sniff_format(f) == "onnx" for f in files):
        return True
    from onnx.reference import ReferenceEvaluator
    import numpy as np
    outputs = []
    for path in files:
        proto = onnx_proto(path)
        name, dims = graph_input(proto)
        x = np.asarray(counterexample["input"], dtype=np.float32).reshape(dims)
        (y, *_) = ReferenceEvaluator(proto).run(None, {name: x})
        outputs.append(torch.as_tensor(np.asarray(y, dtype=np.float64)).reshape(1, -1))
    return bool(query.violated(outputs[1] - outputs[0])[0])


def read_query(path: Union[str, Path]) -> Query:
    """The two-network query in a VNN-LIB 2.0 file (gzipped or not)."""
    try:
        import vnnlib
    except ImportError as exc:
        raise RegionError("reading VNN-LIB 2.0 needs the vnnlib package: pip install 'diffprobe[vnnlib]'") from exc
    try:
        text = vnnlib_text(path)
    except OSError as exc:
        raise RegionError(f"cannot read VNN-LIB file {path}: {exc.strerror or exc}") from exc
    try:
        parsed = vnnlib.parse_query_string(text)
    except vnnlib.VNNLibException as exc:
        raise RegionError(f"{path} is not valid VNN-LIB 2.0: {_parser_message(exc)}") from None
    return _Reader(path, parsed).query()


class _Reader:
    """Walks the parsed query once, refusing what diffprobe cannot answer by name."""

    def __init__(self, path, parsed):
        self.path, self.parsed = path, parsed

    def refuse(self, what):
        return RegionError(f"{self.path}: {what}")

    def query(self) -> Query:
        f, g = self.networks()
        self.inputs = {f.inputs[0].name: (0, tuple(f.inputs[0].shape)), g.inputs[0].name: (1, tuple(g.inputs[0].shape))}
        self.outputs = {f.outputs[0].name: (0, tuple(f.outputs[0].shape)),
                        g.outputs[0].name: (1, tuple(g.outputs[0].shape))}
        in_shape, out_shape = tuple(f.inputs[0].shape), tuple(f.outputs[0].shape)
        if tuple(g.inputs[0].shape) != in_shape or tuple(g.outputs[0].shape) != out_shape:
            raise self.refuse(f"networks {f.name} and {g.name} declare inputs or outputs of other shapes")
        input_dnfs: list = []
        violation: List[List[Atom]] = [[]]
        for assertion in self.parsed.assertions:
            dnf = assertion.expr.to_dnf()
            kinds = {self.kind(c) for conjunct in dnf for c in conjunct}
            if kinds == {"input"}:
                input_dnfs.append(dnf)
            elif kinds == {"output"}:  # the conjunction of two disjunctions, distributed
                violation = [a + self.atoms(c) for a in violation for c in dnf]
            elif kinds:
                raise self.refuse(f"an assertion mixes input and output variables: {_short(assertion)}")
        if violation == [[]]:
            raise self.refuse("no output assertion: the query has no property to check")
        return Query((f.name, g.name), in_shape, out_shape, self.boxes(input_dnfs, math.prod(in_shape)),
                     violation, "isomorphic-to" if g.isometric_to else "equal-to" if g.equal_to else None,
                     (f.inputs[0].name, f.outputs[0].name, g.inputs[0].name, g.outputs[0].name))

    def networks(self):
        nets = list(self.parsed.networks)
        if len(nets) != 2:
            raise self.refuse(f"a {len(nets)}-network query: diffprobe answers queries about two networks")
        for net in nets:
            if len(net.inputs) != 1 or len(net.outputs) != 1:
                raise self.refuse(f"network {net.name} declares {len(net.inputs)} inputs and {len(net.outputs)} "
                                  "outputs: diffprobe reads one of each")
            if net.hidden:
                raise self.refuse(f"network {net.name} declares hidden nodes, which diffprobe does not constrain")
        f, g = nets
        if f.isometric_to or f.equal_to:  # the congruent network second
            f, g = g, f
        return f, g

    def kind(self, comparison):
        names = {t.var.name for side in (comparison.lhs, comparison.rhs) for t in side.to_linear_expr().terms}
        kinds = {"input" if n in self.inputs else "output" if n in self.outputs else "other" for n in names}
        if "other" in kinds or len(kinds) > 1:
            raise self.refuse(f"a comparison over {', '.join(sorted(names))}: diffprobe reads bounds and ties "
                              f"of inputs, or comparisons of outputs: {_short(comparison)}")
        return kinds.pop() if kinds else "input"

    def linear(self, comparison, table):
        """(coefficients per network [2, n], constant) of lhs - rhs."""
        n = math.prod(next(iter(table.values()))[1])
        coeffs, constant = np.zeros((2, n)), 0.0
        for side, sign in ((comparison.lhs, 1.0), (comparison.rhs, -1.0)):
            expr = side.to_linear_expr()
            constant += sign * expr.constant
            for term in expr.terms:
                which, shape = table[term.var.name]
                coeffs[which, _flat_index(term.var.indices, shape, self)] += sign * term.coeff
        return coeffs, constant

    def atoms(self, conjunct):
        atoms = []
        for c in conjunct:
            op = type(c).__name__
            if op not in ("GreaterThan", "GreaterEqual", "LessThan", "LessEqual"):
                raise self.refuse(f"an output comparison with {op}: diffprobe reads <, <=, > and >= "
                                  f"of the output difference: {_short(c)}")
            coeffs, constant = self.linear(c, self.outputs)
            if not np.allclose(coeffs[0], -coeffs[1], rtol=0, atol=0):
                raise self.refuse("an output comparison that is not a function of the difference "
                                  f"Y_g - Y_f (the networks' outputs weighted unequally): {_short(c)}")
            w = torch.tensor(coeffs[1], dtype=torch.float64)  # w . D + constant  (op)  0
            if op.startswith("Less"):
                w, constant = -w, -constant
            atoms.append(Atom(w, -constant, op.endswith("Than")))
        return atoms

    def boxes(self, dnfs, n):
        """The input region: one box per combination of the input assertions' disjuncts."""
        combos = [[]]
        for dnf in dnfs:
            combos = [a + list(c) for a in combos for c in dnf]
            if len(combos) > 10_000:
                raise self.refuse("more than 10,000 input boxes")
        return [self.box(conjunct, n) for conjunct in combos]

    def box(self, conjunct, n):
        lo = torch.full((2, n), -_INF, dtype=torch.float64)
        hi = torch.full((2, n), _INF, dtype=torch.float64)
        tied = np.zeros(n, dtype=bool)
        for c in conjunct:
            coeffs, constant = self.linear(c, self.inputs)
            op = type(c).__name__
            nonzero = np.argwhere(coeffs != 0)
            if op == "Equal" and len(nonzero) == 2 and constant == 0 and {w for w, _ in nonzero} == {0, 1} \
                    and nonzero[0][1] == nonzero[1][1] and coeffs[0, nonzero[0][1]] == -coeffs[1, nonzero[0][1]]:
                tied[nonzero[0][1]] = True
                continue
            if len(nonzero) != 1 or op == "NotEqual":
                raise self.refuse(f"an input constraint that is neither a bound nor a tie of the two networks' "
                                  f"inputs: {_short(c)}")
            (which, i), = nonzero
            value = -constant / coeffs[which, i]  # x (op') value
            flipped = coeffs[which, i] < 0
            upper = op in ("LessEqual", "LessThan", "Equal") if not flipped else op in ("GreaterEqual", "GreaterThan", "Equal")
            lower = op in ("GreaterEqual", "GreaterThan", "Equal") if not flipped else op in ("LessEqual", "LessThan", "Equal")
            if upper:
                hi[which, i] = min(hi[which, i].item(), value)
            if lower:
                lo[which, i] = max(lo[which, i].item(), value)
        if not tied.all():
            raise self.refuse(f"inputs {np.flatnonzero(~tied)[:8].tolist()} of the second network are not tied "
                              "to the first's ((== X[i] X2[i])): diffprobe answers queries over one shared input")
        low, high = lo.amax(dim=0), hi.amin(dim=0)
        unbounded = (~torch.isfinite(low) | ~torch.isfinite(high)).nonzero().reshape(-1)
        if len(unbounded):
            raise self.refuse(f"inputs {unbounded[:8].tolist()} lack a lower or upper bound")
        if bool((low > high).any()):
            raise self.refuse("an input box is empty (a lower bound above its upper bound)")
        return Box(low, high)


def _parser_message(exc):
    """The parser's first complaint in one line (its type checker reports a JSON list of errors)."""
    import json
    text = str(exc).strip()
    try:
        errors = json.loads(text)["errors"]
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"line {first.get('line', '?')}: {first.get('message', '')}: {first.get('hint', '')}{more}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return " ".join(text.split())[:300] or type(exc).__name__


def _flat_index(indices, shape, reader):
    try:
        return int(np.ravel_multi_index(tuple(indices), shape))
    except ValueError:
        raise reader.refuse(f"index {list(indices)} is outside the declared shape {list(shape)}") from None


def _short(node, limit=120):
    text = " ".join(str(node).split())
    return text if len(text) <= limit else text[:limit] + " ..."
