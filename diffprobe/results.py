"""Result value types: frozen dataclasses with a one-line repr, HTML for notebooks, a plot
method and a JSON round trip. The library computes; it never prints, shows or saves."""
import enum
import html
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch


class Verdict(str, enum.Enum):
    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"


def provenance(seed, **extra):
    import diffprobe
    return {"diffprobe": diffprobe.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "seed": seed, **extra}


class _Result:
    """JSON export and notebook display shared by every result type."""

    def to_dict(self):
        return asdict(self)

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), default=_jsonable, **kwargs)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        if "verdict" in data and data["verdict"] is not None:
            data["verdict"] = Verdict(data["verdict"])
        return cls(**data)

    def _rows(self):
        return []

    def _repr_html_(self):
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self._rows())
        return f"<table><caption>{html.escape(repr(self))}</caption>{rows}</table>"


def _jsonable(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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

    def __repr__(self):
        return (f"SearchResult({self.difference}: found {self.found:.4g} after "
                f"{self.evaluations} evaluations, {self.seconds:.2f}s)")

    def witness(self):
        """The witness as a tensor of the models' input shape."""
        return torch.tensor(self.x).reshape(self.input_shape)

    def _rows(self):
        return [("difference", self.difference), ("found", f"{self.found:.6g}"),
                ("evaluations", self.evaluations), ("seed", self.seed), ("seconds", f"{self.seconds:.2f}")]

    def plot(self, ax=None):
        """The best value over the search steps."""
        import matplotlib.pyplot as plt
        ax = ax or plt.gca()
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

    def __repr__(self):
        verdict = f", {self.verdict.value}" if self.verdict else ""
        return (f"Certificate({self.difference} via {self.method}: found {self.found:.4g} <= "
                f"max <= {self.bound:.4g}, gap ratio {self.gap_ratio:.3g}{verdict}, {self.seconds:.2f}s)")

    def _rows(self):
        return [("difference", self.difference), ("method", self.method), ("bound", f"{self.bound:.6g}"),
                ("found", f"{self.found:.6g}"), ("gap ratio", f"{self.gap_ratio:.4g}"),
                ("verdict", self.verdict.value if self.verdict else "-"), ("branches", self.branches),
                ("seconds", f"{self.seconds:.2f}")]

    def plot(self, ax=None):
        """Per-output certified interval of the difference."""
        import matplotlib.pyplot as plt
        ax = ax or plt.gca()
        from .figures import bars
        bars(ax, self.lower, self.upper, "certified interval")
        if self.threshold is not None:
            ax.axhline(self.threshold, color="red", ls="--", label="threshold")
        ax.set_xlabel("output / spec row")
        ax.set_ylabel(self.difference)
        ax.legend()
        return ax


_RISK = {"falsified": 0, "unknown": 1, None: 2, "verified": 3}


@dataclass(frozen=True)
class DriftReport(_Result):
    """Per-point certified drift over a dataset: bound, witness value and verdict for each point,
    the counts, the worst case, and both models' accuracy and agreement at the data points."""

    difference: str
    eps: Optional[float]
    norm: str
    threshold: Optional[float]
    method: str
    points: list  # dicts: index, bound, found, verdict, label_a, label_b, [label], witness, ...
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

    def __repr__(self):
        c = self.counts
        verdict = f"{self.verdict.value}: " if self.verdict else ""
        return (f"DriftReport({self.difference} over {len(self.points)}/{self.total} points, eps {self.eps}, {verdict}"
                f"{c.get('verified', 0)} verified, {c.get('falsified', 0)} falsified, "
                f"{c.get('unknown', 0)} unknown; worst bound {_g(self.bound)}, {self.seconds:.1f}s)")

    def ranked(self, n=None):
        """Points by risk: falsified (largest witness first), unknown (largest bound), verified."""
        key = lambda p: (_RISK[p["verdict"]], -(p["found"] if p["verdict"] == "falsified" else p["bound"]))
        return sorted(self.points, key=key)[:n]

    def _rows(self):
        return [("difference", self.difference), ("eps", self.eps), ("threshold", self.threshold),
                ("points", f"{len(self.points)} of {self.total}"), *self.counts.items(),
                ("verdict", self.verdict.value if self.verdict else "-"),
                ("worst bound", _g(self.bound)), ("worst found", _g(self.found)),
                ("accuracy a / b", f"{_g(self.accuracy_a)} / {_g(self.accuracy_b)}"),
                ("top-1 agreement", _g(self.agreement)), ("seconds", f"{self.seconds:.1f}")]

    def _repr_html_(self):
        from .figures import thumbnail
        rows = []
        for p in self.ranked(8):
            png = thumbnail(p["witness"], self.input_shape) if p.get("witness") else None
            img = f"<img src='data:image/png;base64,{png}'/>" if png else ""
            rows.append(f"<tr><td>{p['index']}</td><td>{p['verdict']}</td><td>{p['bound']:.4g}</td>"
                        f"<td>{p['found']:.4g}</td><td>{img}</td></tr>")
        riskiest = ("<table><tr><th>point</th><th>verdict</th><th>bound</th><th>found</th><th>witness</th></tr>"
                    + "".join(rows) + "</table>")
        return super()._repr_html_() + "<p>riskiest points</p>" + riskiest

    def plot(self, ax=None):
        """Histogram of the per-point certified bounds, coloured by verdict."""
        import matplotlib.pyplot as plt
        from .figures import verdict_histogram
        ax = ax or plt.gca()
        verdict_histogram(self.points, self.threshold, ax)
        ax.set_title(f"drift at eps {self.eps}")
        return ax


def _g(v):
    return "-" if v is None else f"{v:.4g}"
