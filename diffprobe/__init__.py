"""diffprobe: how differently can two neural networks behave?

Search finds a witness (a lower bound on the worst-case difference); certify bounds the
difference over a whole input region (an upper bound). Both take the same few plain types.
"""
from .version import __version__  # noqa: F401

from .differences import DIFFERENCES, Difference, get_difference, register_difference
from .errors import (ArgumentError, CheckpointError, DataError, DiffprobeError, OutputError, RegionError, ShapeMismatchError,
                     UnsafeCheckpointError, UnsupportedOperationError)
from .graph import compose
from .loading import load_model
from .regions import L2Ball, LinfBall, Box, ball, box_from_vnnlib
from .vnnlib2 import read_query
from .results import (CapabilityStudy, Certificate, DriftReport, PointResult, QueryResult, SearchResult, Spread,
                      StabilityStudy, StructuralStability, Verdict)
from ._search import search
from ._dream import dream
from .certification import certify
from ._drift import drift
from ._stability import stability, structural_stability
from ._solve import solve
from ._capability import CapabilityRecorder, capability


__all__ = ["search", "dream", "certify", "drift", "solve", "stability", "structural_stability", "DriftReport",
           "PointResult", "QueryResult", "StabilityStudy", "Spread", "StructuralStability", "capability", "CapabilityRecorder", "CapabilityStudy", "compose", "load_model", "Box", "LinfBall", "L2Ball", "ball",
           "box_from_vnnlib", "read_query", "Difference", "DIFFERENCES", "get_difference", "register_difference",
           "SearchResult", "Certificate", "Verdict", "DiffprobeError", "ArgumentError", "CheckpointError",
           "UnsafeCheckpointError", "ShapeMismatchError", "RegionError", "UnsupportedOperationError",
           "DataError", "OutputError"]
