"""The JSON Lines record of a drift run's finished points, so an interrupted run resumes.

Line 1 is a header: the format version, a run id, the settings, the number of points and a
fingerprint of their regions. Each further line is one finished point carrying `chain`, the SHA-256
of the previous line's chain (the header's digest for the first) and of the point itself: a line
from another run, an edited, forged or reordered line breaks the chain and is refused on resume,
naming its line number. A last line cut short by a crash is dropped and its point redone.
"""
import hashlib
import json
import math
import uuid
from pathlib import Path

from .errors import DataError
from .outputs import append_lines, write_text
from .results import json_safe

VERSION = 2
VERDICTS = ("verified", "falsified", "unknown", None)


def _digest(previous, value):
    text = json.dumps(json_safe(value), sort_keys=True, allow_nan=False)
    return hashlib.sha256((previous + text).encode()).hexdigest()


class Checkpoint:
    """Finished points of one drift run at `path` (None: no record is kept)."""

    def __init__(self, path, settings, total, fingerprint):
        self.path, self.total = (Path(path) if path else None), total
        self.header = {"diffprobe_drift": VERSION, "run": uuid.uuid4().hex, "settings": settings,
                       "points": total, "data": fingerprint}
        self.chain = None

    def resume(self):
        """The finished points of an earlier run of the same settings and data, by index; refuses a
        file whose lines do not all belong to that run."""
        if self.path is None or not self.path.exists():
            return {}
        lines = self.path.read_text(errors="replace").splitlines()
        header = _parsed(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("diffprobe_drift") != VERSION:
            raise DataError(f"{self.path} is not a diffprobe drift record of this version; remove it or "
                            "drop resume to start over")
        own = {k: v for k, v in self.header.items() if k != "run"}
        if {k: header.get(k) for k in own} != json.loads(json.dumps(json_safe(own))):
            raise DataError(f"{self.path} was written by a run with other settings or data; remove it or "
                            "drop resume to start over")
        self.header["run"] = header.get("run")
        chain, done = _digest("", header), {}
        for number, line in enumerate(lines[1:], start=2):
            record = _parsed(line)
            if record is None and number == len(lines):
                break  # a line cut short by a crash: that point runs again
            record = self._checked(record, chain, number, done)
            chain = record.pop("chain")
            done[record["index"]] = record
        return done

    def _checked(self, record, chain, number, done):
        where = f"{self.path}, line {number}"
        if not isinstance(record, dict) or record.get("chain") != _digest(chain, _without_chain(record)):
            raise DataError(f"{where} does not belong to this run (another run's, edited or damaged); remove "
                            "the file or drop resume to start over")
        index = record.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.total or index in done:
            raise DataError(f"{where}: point index {index!r} is out of range or repeated")
        if record.get("verdict") not in VERDICTS or not all(_number(record.get(k)) for k in ("bound", "found")):
            raise DataError(f"{where}: malformed point record")
        if record.get("bound") is None:  # JSON has no inf: an unbounded point was written as null
            record["bound"] = math.inf
        return record

    def start(self, done):
        """Write the header and the points kept from an earlier run (the file rewritten whole)."""
        if self.path is None:
            return
        self.chain = _digest("", self.header)
        lines = [json.dumps(json_safe(self.header), allow_nan=False)]
        for record in done.values():
            lines.append(self._line(record))
        write_text(self.path, "\n".join(lines) + "\n")

    def append(self, records):
        if self.path is not None:
            append_lines(self.path, [self._line(r) for r in records])

    def _line(self, record):
        record = json_safe({k: v for k, v in record.items() if k != "chain"})
        self.chain = _digest(self.chain, record)
        return json.dumps({**record, "chain": self.chain}, allow_nan=False)


def _without_chain(record):
    return {k: v for k, v in record.items() if k != "chain"}


def _number(value):
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _parsed(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def is_checkpoint(path):
    """Whether `path` holds a diffprobe drift record (any version)."""
    try:
        with open(path, errors="replace") as handle:
            header = _parsed(handle.readline())
    except OSError:
        return False
    return isinstance(header, dict) and "diffprobe_drift" in header
