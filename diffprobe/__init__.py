"""diffprobe: how differently can two neural networks behave?

Search finds a witness (a lower bound on the worst-case difference); certify bounds the
difference over a whole input region (an upper bound). Both take the same few plain types.

The public names below are imported on first use (PEP 562), so `import diffprobe` — and the
`diffprobe --help` of the command line — does not wait for torch.
"""
import importlib
from typing import TYPE_CHECKING

from .version import __version__  # noqa: F401

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(["search"], "._search"), "dream": "._dream", "certify": ".certification",
    "drift": "._drift", "solve": "._solve", "localize": "._localize",
    **dict.fromkeys(["stability", "structural_stability"], "._stability"),
    **dict.fromkeys(["capability", "CapabilityRecorder"], "._capability"),
    "compose": ".graph", "load_model": ".loading", "read_query": ".vnnlib2",
    **dict.fromkeys(["Box", "LinfBall", "L2Ball", "ball", "box_from_vnnlib"], ".regions"),
    **dict.fromkeys(["Difference", "DIFFERENCES", "get_difference", "register_difference"], ".differences"),
    **dict.fromkeys(["SearchResult", "Certificate", "DriftReport", "PointResult", "QueryResult", "LayerReport",
                     "LayerDrift", "StabilityStudy", "Spread", "StructuralStability", "CapabilityStudy",
                     "Verdict"], ".results"),
    **dict.fromkeys(["DiffprobeError", "ArgumentError", "CheckpointError", "UnsafeCheckpointError",
                     "ShapeMismatchError", "RegionError", "UnsupportedOperationError", "DataError",
                     "OutputError"], ".errors"),
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'diffprobe' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # what type checkers and editors see
    from ._capability import CapabilityRecorder, capability  # noqa: F401
    from ._drift import drift  # noqa: F401
    from ._dream import dream  # noqa: F401
    from ._localize import localize  # noqa: F401
    from ._search import search  # noqa: F401
    from ._solve import solve  # noqa: F401
    from ._stability import stability, structural_stability  # noqa: F401
    from .certification import certify  # noqa: F401
    from .differences import DIFFERENCES, Difference, get_difference, register_difference  # noqa: F401
    from .errors import (ArgumentError, CheckpointError, DataError, DiffprobeError, OutputError,  # noqa: F401
                         RegionError, ShapeMismatchError, UnsafeCheckpointError, UnsupportedOperationError)
    from .graph import compose  # noqa: F401
    from .loading import load_model  # noqa: F401
    from .regions import L2Ball, LinfBall, Box, ball, box_from_vnnlib  # noqa: F401
    from .results import (CapabilityStudy, Certificate, DriftReport, LayerDrift, LayerReport,  # noqa: F401
                          PointResult, QueryResult, SearchResult, Spread, StabilityStudy, StructuralStability,
                          Verdict)
    from .vnnlib2 import read_query  # noqa: F401
