"""The exceptions diffprobe raises for user mistakes; each message says what to do next."""


class DiffprobeError(Exception):
    """Base class: the CLI prints these as one line and exits with code 1."""


class CheckpointError(DiffprobeError):
    """A model file is unreadable, of an unknown format, or holds bad weights."""


class UnsafeCheckpointError(CheckpointError):
    """A model file could run code when loaded and `trust` was not given."""


class ShapeMismatchError(DiffprobeError):
    """The two models, the region or the data disagree about input or output shapes."""


class RegionError(DiffprobeError):
    """A region is empty, malformed or has a negative radius."""


class UnsupportedOperationError(DiffprobeError):
    """A model uses operations a method cannot handle; lists all of them at once."""

    def __init__(self, ops, what="this method", hint=""):
        self.ops = sorted(set(ops))
        msg = f"{what} cannot handle: {', '.join(self.ops)}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class DataError(DiffprobeError):
    """A data file is empty, malformed, or does not match the models."""


class OutputError(DiffprobeError):
    """A result cannot be written where asked without harming other files."""


class ArgumentError(DiffprobeError, ValueError):
    """An argument outside its documented choices (a ValueError too, as Python's own are)."""
