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
        k = range(len(self.lower))
        ax.bar(k, [u - l for l, u in zip(self.lower, self.upper)], bottom=self.lower, alpha=0.6,
               label="certified interval")
        ax.axhline(0, color="black", lw=0.5)
        if self.threshold is not None:
            ax.axhline(self.threshold, color="red", ls="--", label="threshold")
        ax.set_xlabel("output / spec row")
        ax.set_ylabel(self.difference)
        ax.legend()
        return ax
