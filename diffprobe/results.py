"""Result value types: frozen dataclasses with a one-line repr, HTML for notebooks, a plot
method and a JSON round trip. The library computes; it never prints, shows or saves."""
import enum
import html
import math
import json
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

import torch

from .figures import bars, interval_png, on_axes, output_bars, thumbnail, verdict_histogram
from .version import __version__


class Verdict(str, enum.Enum):
    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"


def provenance(seed, **extra):
    return {"diffprobe": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "seed": seed, **extra}


class _Result:
    """JSON export and notebook display shared by every result type."""

    def to_dict(self):
        return asdict(self)

    def to_json(self, **kwargs):
        """Strict JSON: an infinite or NaN number (an unbounded bound) is written as null."""
        return json.dumps(json_safe(self.to_dict()), default=_jsonable, allow_nan=False, **kwargs)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        for key, value in _UNBOUNDED.items():  # null bounds were unbounded ones
            if key in data and data[key] is None:
                data[key] = value
            elif key in data and isinstance(data[key], list):
                data[key] = [value if v is None else v for v in data[key]]
        if "verdict" in data and data["verdict"] is not None:
            data["verdict"] = Verdict(data["verdict"])
        return cls(**cls._typed(data))

    @classmethod
    def _typed(cls, data):
        """The JSON fields turned back into the record types they were written from."""
        return data

    def _rows(self):
        return []

    def _figure(self):
        """A small base64 PNG beside the table (the witness image, or per-output bars), or None."""
        return None

    def _repr_html_(self):
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self._rows())
        table = f"<table><caption>{html.escape(repr(self))}</caption>{rows}</table>"
        png = self._figure()
        if png is None:
            return table
        return (f"<div style='display:flex;gap:1em;align-items:flex-start'>{table}"
                f"<img src='data:image/png;base64,{png}'/></div>")


_UNBOUNDED = {"bound": float("inf"), "upper": float("inf"), "lower": float("-inf")}


def json_safe(obj):
    """`obj` with every non-finite float replaced by None (JSON has no inf or NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _jsonable(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass(frozen=True, kw_only=True)
class PointResult:
    """One point of a drift run: its certified bound, the witness value found below it, the
    verdict, and both models' labels at the data point. Optional fields are left out of the JSON
    when absent (`gradient_masked` is there only when the search ran)."""

    bound: float
    found: float
    witness: Optional[list] = None  # the witness input, flattened (the report's input_shape)
    branches: int = 1
    notes: list = field(default_factory=list)
    verdict: Optional[Verdict] = None
    seconds: float = 0.0
    gradient_masked: Optional[bool] = None
    index: int = 0
    label_a: Optional[int] = None
    label_b: Optional[int] = None
    source: Optional[str] = None  # the file the region was read from
    label: Optional[int] = None  # the data point's true label

    _OPTIONAL = ("gradient_masked", "source", "label")

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["verdict"] = self.verdict.value if self.verdict else None
        return {k: v for k, v in data.items() if v is not None or k not in self._OPTIONAL}

    @classmethod
    def from_dict(cls, data: dict) -> "PointResult":
        if not isinstance(data, dict):
            raise ValueError("a drift point is not a JSON object")
        data = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        if data.get("bound", 0) is None:  # JSON has no inf: an unbounded point was written as null
            data["bound"] = float("inf")
        if data.get("verdict") is not None:
            data["verdict"] = Verdict(data["verdict"])
        return cls(**data)

    def __getitem__(self, key: str) -> Any:
        """`point["bound"]`, as when points were dicts (scripts written against the JSON)."""
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None)
        return default if value is None else value


@dataclass(frozen=True)
class Spread:
    """The mean pairwise distance between the members of a study axis, with its 95 % bootstrap
    interval."""

    mean: float
    low: float
    high: float

    def __getitem__(self, key: str) -> float:
        """`spread["mean"]`, as when spreads were dicts."""
        return getattr(self, key)

    def __str__(self):
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class SearchResult(_Result):
    """The best witness found: an input inside the region and how much the models differ there."""

    difference: str
    found: float
    x: list
    input_shape: list
    output_a: list
    output_b: list
    evaluations: int
    seed: int
    trace: list
    seconds: float
    region: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    arithmetic: dict = field(default_factory=dict)  # model_a / model_b: what the models ran in
    interrupted: bool = False  # Ctrl-C stopped the search: the best point so far
    gradient_masked: bool = False  # the gradient-free search beat the gradient ascent (a rounded model?)

    def __repr__(self):
        return (f"SearchResult({self.difference}: found {self.found:.4g} after "
                f"{self.evaluations} evaluations, {self.seconds:.2f}s)")

    def witness(self, dtype=torch.float64):
        """The witness as a tensor of the models' input shape (float64: the precision `found` was
        checked in; pass dtype=torch.float32 to feed a float32 model)."""
        return torch.tensor(self.x, dtype=dtype).reshape(self.input_shape)

    def _rows(self):
        return [("difference", self.difference), ("found", f"{self.found:.6g}"),
                ("evaluations", self.evaluations), ("seed", self.seed), ("seconds", f"{self.seconds:.2f}")]

    def _figure(self):
        return thumbnail(self.x, self.input_shape, size=1.4) or output_bars(
            {"model_a": self.output_a, "model_b": self.output_b}, "outputs at the witness")

    def plot(self, ax=None):
        """The best value over the search steps."""
        ax = on_axes(ax)
        ax.plot(range(1, len(self.trace) + 1), self.trace)
        ax.set_xlabel("step")
        ax.set_ylabel(f"best {self.difference}")
        ax.set_title("disagreement search")
        return ax


@dataclass(frozen=True)
class Certificate(_Result):
    """Certified bounds on the difference over a region, the witness below them and a verdict."""

    difference: str
    method: str
    lower: list
    upper: list
    bound: float
    found: float
    gap_ratio: float
    verdict: Optional[Verdict]
    threshold: Optional[float]
    seconds: float
    seed: int
    witness: Optional[list] = None
    branches: int = 1
    region: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    arithmetic: dict = field(default_factory=dict)  # model_a / model_b: what the bound covers
    interrupted: bool = False  # Ctrl-C stopped branch-and-bound: the bound so far

    def __repr__(self):
        verdict = f", {self.verdict.value}" if self.verdict else ""
        return (f"Certificate({self.difference} via {self.method}: found {self.found:.4g} <= "
                f"max <= {self.bound:.4g}, gap ratio {self.gap_ratio:.3g}{verdict}, {self.seconds:.2f}s)")

    def _rows(self):
        return [("difference", self.difference), ("method", self.method), ("bound", f"{self.bound:.6g}"),
                ("found", f"{self.found:.6g}"), ("gap ratio", f"{self.gap_ratio:.4g}"),
                ("verdict", self.verdict.value if self.verdict else "-"), ("branches", self.branches),
                ("arithmetic", arithmetic_text(self.arithmetic)), ("seconds", f"{self.seconds:.2f}")]

    def _figure(self):
        shape = self.region.get("shape") or [len(self.witness or [])]
        image = thumbnail(self.witness, shape, size=1.4) if self.witness else None
        return image or interval_png(self.lower, self.upper, self.difference)

    def plot(self, ax=None):
        """Per-output certified interval of the difference."""
        ax = on_axes(ax)
        bars(ax, self.lower, self.upper, "certified interval")
        if self.threshold is not None:
            ax.axhline(self.threshold, color="red", ls="--", label="threshold")
        ax.set_xlabel("output / spec row")
        ax.set_ylabel(self.difference)
        ax.legend()
        return ax


_RISK = {Verdict.FALSIFIED: 0, Verdict.UNKNOWN: 1, None: 2, Verdict.VERIFIED: 3}


@dataclass(frozen=True)
class DriftReport(_Result):
    """Per-point certified drift over a dataset: bound, witness value and verdict for each point,
    the counts, the worst case, and both models' accuracy and agreement at the data points."""

    difference: str
    eps: Optional[float]
    norm: str
    threshold: Optional[float]
    method: str
    points: list[PointResult]
    counts: dict
    total: int
    bound: Optional[float]  # the worst certified bound over the points
    found: Optional[float]  # the worst witness value over the points
    verdict: Optional[Verdict]  # verified if every point is, falsified if any is, else unknown
    accuracy_a: Optional[float]
    accuracy_b: Optional[float]
    agreement: Optional[float]
    input_shape: list
    seconds: float
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    arithmetic: dict = field(default_factory=dict)  # model_a / model_b: what the bounds cover

    def __repr__(self):
        c = self.counts
        verdict = f"{self.verdict.value}: " if self.verdict else ""
        return (f"DriftReport({self.difference} over {len(self.points)}/{self.total} points, eps {self.eps}, {verdict}"
                f"{c.get('verified', 0)} verified, {c.get('falsified', 0)} falsified, "
                f"{c.get('unknown', 0)} unknown; worst bound {_g(self.bound)}, {self.seconds:.1f}s)")

    def to_dict(self):
        return {**asdict(replace(self, points=[])), "points": [p.to_dict() for p in self.points]}

    @classmethod
    def _typed(cls, data):
        points = data.get("points")
        if not isinstance(points, list):
            raise ValueError("points is not a list")
        return {**data, "points": [PointResult.from_dict(p) for p in points]}

    def ranked(self, n: Optional[int] = None) -> list[PointResult]:
        """Points by risk: falsified (largest witness first), unknown (largest bound), verified."""
        key = lambda p: (_RISK[p.verdict], -(p.found if p.verdict == Verdict.FALSIFIED else p.bound))
        return sorted(self.points, key=key)[:n]

    def _rows(self):
        return [("difference", self.difference), ("eps", self.eps), ("threshold", self.threshold),
                ("points", f"{len(self.points)} of {self.total}"), *self.counts.items(),
                ("verdict", self.verdict.value if self.verdict else "-"),
                ("worst bound", _g(self.bound)), ("worst found", _g(self.found)),
                ("accuracy a / b", f"{_g(self.accuracy_a)} / {_g(self.accuracy_b)}"),
                ("top-1 agreement", _g(self.agreement)), ("arithmetic", arithmetic_text(self.arithmetic)),
                ("seconds", f"{self.seconds:.1f}")]

    def _repr_html_(self):
        rows = []
        for p in self.ranked(8):
            png = thumbnail(p.witness, self.input_shape) if p.witness else None
            img = f"<img src='data:image/png;base64,{png}'/>" if png else ""
            verdict = p.verdict.value if p.verdict else "-"
            cells = (p.index, verdict, _g(p.bound), _g(p.found))  # strings from files: escaped
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + f"<td>{img}</td></tr>")
        riskiest = ("<table><tr><th>point</th><th>verdict</th><th>bound</th><th>found</th><th>witness</th></tr>"
                    + "".join(rows) + "</table>")
        return super()._repr_html_() + "<p>riskiest points</p>" + riskiest

    def plot(self, ax=None):
        """Histogram of the per-point certified bounds, coloured by verdict."""
        ax = on_axes(ax)
        verdict_histogram(self.points, self.threshold, ax)
        ax.set_title(f"drift at eps {self.eps}")
        return ax


def _g(v):
    return "-" if v is None else f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def arithmetic_text(labels):
    """'model_a fp32, model_b fp16', or one word when both ran in the same arithmetic."""
    a, b = labels.get("model_a", "-"), labels.get("model_b", "-")
    return a if a == b else f"model_a {a}, model_b {b}"


@dataclass(frozen=True)
class StabilityStudy(_Result):
    """Pairwise distances between members trained along each axis, their spread with bootstrap
    confidence intervals, and the axes ranked by spread."""

    axes: list
    members: int
    base: dict
    values: dict  # axis -> the value of each member
    distances: dict  # axis -> metric -> [members x members]
    spread: dict[str, dict[str, Spread]]  # axis -> metric -> spread
    ranking: list
    rank_by: str
    eps: float
    norm: str
    regions: int
    seconds: float
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def __repr__(self):
        order = " > ".join(f"{a} ({self.spread[a][self.rank_by].mean:.3g})" for a in self.ranking)
        return f"StabilityStudy({self.members} members per axis; by {self.rank_by}: {order}; {self.seconds:.1f}s)"

    def _rows(self):
        metrics = list(next(iter(self.spread.values())))
        return [(a, ", ".join(f"{m} {self.spread[a][m]}" for m in metrics)) for a in self.ranking]

    @classmethod
    def _typed(cls, data):
        spread = {axis: {metric: Spread(**s) for metric, s in by_metric.items()}
                  for axis, by_metric in data["spread"].items()}
        return {**data, "spread": spread}

    def plot(self, ax=None, metric=None):
        """Spread per axis (mean pairwise distance) with its 95 % bootstrap interval."""
        metric = metric or self.rank_by
        ax = on_axes(ax)
        spreads = [self.spread[a][metric] for a in self.ranking]
        means = [s.mean for s in spreads]
        err = [[s.mean - s.low for s in spreads], [s.high - s.mean for s in spreads]]
        ax.bar(self.ranking, means, yerr=err, capsize=4, alpha=0.7)
        ax.set_ylabel(f"mean pairwise {metric}")
        ax.set_title("spread per axis (95 % bootstrap CI)")
        return ax

    def plot_matrices(self, metric=None, fig=None):
        """One heatmap of the pairwise distance matrix per axis, drawn on `fig` (a new pyplot
        figure by default); returns the figure."""
        if fig is None:
            import matplotlib.pyplot as plt
            fig = plt.figure(figsize=(3.2 * len(self.axes), 3))
        metric = metric or self.rank_by
        axes = fig.subplots(1, len(self.axes), squeeze=False)
        for ax, axis in zip(axes[0], self.axes):
            image = ax.imshow(self.distances[axis][metric], cmap="viridis")
            ax.set_title(f"{axis}: {metric}", fontsize=9)
            labels = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in self.values[axis]]
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.tight_layout()
        return fig


@dataclass(frozen=True)
class StructuralStability(_Result):
    """Drift of one model against perturbed copies of itself, per perturbation kind and scale."""

    kinds: list
    scales: list
    samples: int
    curves: dict  # kind -> [{"scale", "kl", "js", "disagreement", "found", "certified"}]
    eps: float
    regions: int
    seconds: float
    provenance: dict = field(default_factory=dict)

    def __repr__(self):
        top = {k: rows[-1] for k, rows in self.curves.items()}
        parts = ", ".join(f"{k} {r.get('certified', r['kl']):.3g}" for k, r in top.items())
        what = "certified" if self.regions else "KL"
        return f"StructuralStability({what} drift at scale {self.scales[-1]}: {parts}; {self.seconds:.1f}s)"

    def _rows(self):
        return [(f"{k} @ {r['scale']}", ", ".join(f"{m} {v:.3g}" for m, v in r.items() if m != "scale"))
                for k, rows in self.curves.items() for r in rows]

    def plot(self, ax=None):
        """Found (dashed) and certified (solid) worst-case drift against the perturbation scale."""
        ax = on_axes(ax)
        for kind, rows in self.curves.items():
            scales = [r["scale"] for r in rows]
            if self.regions:
                line, = ax.plot(scales, [r["certified"] for r in rows], "o-", label=f"{kind} certified")
                ax.plot(scales, [r["found"] for r in rows], "^--", color=line.get_color(), label=f"{kind} found")
            else:
                ax.plot(scales, [r["kl"] for r in rows], "o-", label=f"{kind} KL")
        ax.set_xlabel("perturbation scale")
        ax.set_ylabel("max |b - a| over the balls" if self.regions else "KL")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        return ax


@dataclass(frozen=True)
class CapabilityStudy(_Result):
    """Per optimiser: capability, mesa capability, alignment, their robustness under perturbations,
    and the recorded trajectories."""

    optimisers: dict  # name -> capability, mesa_capability, alignment, robustness, losses, ...
    perturbations: dict
    seconds: float
    provenance: dict = field(default_factory=dict)

    def __repr__(self):
        parts = ", ".join(f"{n}: C {o['capability']:.3g}, C_mesa {o['mesa_capability']:.3g}, "
                          f"alpha {o['alignment']:.3g}" for n, o in self.optimisers.items())
        return f"CapabilityStudy({parts})"

    def _rows(self):
        return [(n, f"C {o['capability']:.4g}, C_mesa {o['mesa_capability']:.4g}, alpha {o['alignment']:.4g}, "
                    + ", ".join(f"|dC| {p} {v:.3g}" for p, v in o["robustness"].items()))
                for n, o in self.optimisers.items()]

    def plot(self, ax=None, which="losses"):
        """The recorded trajectories: `losses` (base objective), `grad_norms` (mesa objective)
        or `heldout_losses`."""
        ax = on_axes(ax)
        for name, o in self.optimisers.items():
            if o.get(which):
                ax.plot(o[which], label=name)
        ax.set_xlabel("recorded step")
        ax.set_ylabel(which.replace("_", " "))
        ax.set_yscale("log")
        ax.legend()
        return ax


@dataclass(frozen=True)
class QueryResult(_Result):
    """The answer to a two-network VNN-LIB query: `sat` (with a counterexample checked on the
    models as they run), `unsat` (certified), `unknown` or `timeout`."""

    result: str
    networks: list
    boxes: int  # input boxes in the query's region
    bound: float  # the certified bound of max |model_g - model_f| over the region (inf: not every box was bounded)
    counterexample: Optional[dict]  # input, output_f, output_g (flattened) and the violation margin
    method: Optional[str]
    seconds: float
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def __repr__(self):
        bound = f", bound {_g(self.bound)}" if math.isfinite(self.bound) else ""
        return f"QueryResult({self.result}{bound}, {self.seconds:.1f}s)"

    def _rows(self):
        return [("result", self.result), ("networks", " vs ".join(self.networks)), ("boxes", self.boxes),
                ("bound", _g(self.bound)), ("method", self.method or "-"), ("seconds", f"{self.seconds:.1f}")]

    def plot(self, ax=None):
        """The two networks' outputs at the counterexample (nothing to draw without one)."""
        ax = on_axes(ax)
        if self.counterexample:
            bars_of = {"f": self.counterexample["output_f"], "g": self.counterexample["output_g"]}
            for offset, (name, values) in enumerate(bars_of.items()):
                ax.bar([i + 0.4 * offset for i in range(len(values))], values, width=0.4, label=name)
            ax.legend()
        ax.set_title(f"{self.result}: outputs at the counterexample" if self.counterexample else self.result)
        return ax


@dataclass(frozen=True)
class LayerDrift:
    """One layer of a `LayerReport`: sampled error of its output on the models as they run, and the
    certified bound of the output difference when only it differs and when all but it do."""

    name: str
    kind: str  # model_b's module type
    sqnr_db: Optional[float]  # 10 log10(|a|^2 / |b - a|^2): model_b's layer on model_a's layer input; inf: identical
    max_abs: Optional[float]  # max |b - a| of that output over the samples (None: not observed)
    relative: Optional[float]  # |b - a| / |a| of that output
    accumulated_sqnr_db: Optional[float]  # the whole models compared at this layer's output
    only: float  # certified bound with only this layer's weights from model_b
    all_but: float  # certified bound with every other matching layer's weights from model_b


@dataclass(frozen=True)
class LayerReport(_Result):
    """Which layer makes the models differ: per matching layer, sampled and certified, ranked."""

    layers: list[LayerDrift]
    ranking: list  # layer names, the largest certified `only` bound first
    bound: float  # certified bound with every matching layer's weights from model_b
    difference: str
    regions: int
    samples: int
    seconds: float
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def __repr__(self):
        top = ", ".join(self.ranking[:3])
        return f"LayerReport({len(self.layers)} layers; largest contribution: {top}; {self.seconds:.1f}s)"

    @classmethod
    def _typed(cls, data):
        return {**data, "layers": [LayerDrift(**_layer_fields(layer)) for layer in data["layers"]]}

    def ranked(self):
        """The layers in `ranking` order."""
        by_name = {layer.name: layer for layer in self.layers}
        return [by_name[name] for name in self.ranking]

    def _rows(self):
        return [(r.name, f"only {_g(r.only)}, all but {_g(r.all_but)}, SQNR {_g(r.sqnr_db)} dB, "
                         f"max |delta| {_g(r.max_abs)}") for r in self.ranked()]

    def plot(self, ax=None):
        """Per layer (in model order): the certified bound when only it differs, and the sampled
        max |delta| of its output."""
        ax = on_axes(ax)
        names = [layer.name for layer in self.layers]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [layer.only for layer in self.layers], width=0.4, label="certified, only this layer")
        ax.bar([i + 0.2 for i in x], [layer.max_abs for layer in self.layers], width=0.4, label="sampled max |delta|")
        ax.set_xticks(list(x), names, rotation=45, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"drift per layer (all layers: {_g(self.bound)})")
        ax.legend(fontsize=7)
        return ax


def _layer_fields(layer):
    """A layer's JSON fields typed back: null bounds were unbounded ones, a null SQNR of an
    identical layer was infinite."""
    fields_ = dict(layer)
    for key in ("only", "all_but"):
        fields_[key] = math.inf if fields_[key] is None else fields_[key]
    if fields_["sqnr_db"] is None and fields_["max_abs"] == 0:
        fields_["sqnr_db"] = math.inf
    if fields_["accumulated_sqnr_db"] is None and fields_["max_abs"] is not None:
        fields_["accumulated_sqnr_db"] = math.inf  # observed, so null was infinite (identical)
    return fields_
