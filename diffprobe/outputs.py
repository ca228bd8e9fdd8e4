"""Writing result files safely: never through a symbolic link, never over an input or a file
diffprobe did not write, always whole (a temporary file renamed into place), into a folder
checked before the work starts."""
import json
import os
import tempfile
from pathlib import Path

from .errors import OutputError


def check_output(path, inputs=(), recognised=None, force=False):
    """Raise `OutputError` unless `path` may be written: it is not a symbolic link, not one of
    `inputs` (files the run reads), its folder exists and is writable, and it is absent, or
    `recognised(path)` says diffprobe wrote it, or `force`."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link; diffprobe does not write through links: give a plain path")
    for given in inputs:
        if given is not None and _same(path, given):
            raise OutputError(f"{path} is also an input of this run ({given}); write the result elsewhere")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"the folder of {path} does not exist; create it or choose another path")
    try:  # a real write, not permission bits: root passes those everywhere, /proc refuses anyway
        handle, probe = tempfile.mkstemp(prefix=".diffprobe-probe.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError:
        raise OutputError(f"the folder of {path} is not writable; choose another path") from None
    if path.exists() and not force and not (recognised and recognised(path)):
        raise OutputError(f"{path} exists and was not written by diffprobe; remove it, choose another path, "
                          "or overwrite it with force=True")


def _same(path, other):
    try:
        return Path(other).exists() and path.exists() and os.path.samefile(path, other)
    except OSError:
        return False


def write_text(path, text):
    """Write `text` to `path` whole: a temporary file in the same folder, renamed over `path` (a
    rename replaces a link that appeared since, rather than writing through it)."""
    write_bytes(path, text.encode())


def write_bytes(path, data):
    """`write_text` for bytes."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def append_lines(path, lines):
    """Append text lines to `path`, refusing to open it through a symbolic link."""
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as exc:
        raise OutputError(f"cannot append to {path} ({exc.strerror or exc}); is it a symbolic link?") from exc
    with os.fdopen(descriptor, "a") as out:
        for line in lines:
            out.write(line + "\n")
        out.flush()


def is_result(path):
    """Whether `path` holds a diffprobe result (JSON with diffprobe's provenance)."""
    try:
        with open(path) as handle:
            data = json.loads(handle.read(50_000_000))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("provenance"), dict) and "diffprobe" in data["provenance"]


def is_report(path):
    """Whether `path` holds an HTML page diffprobe wrote."""
    try:
        with open(path, errors="replace") as handle:
            return "<title>diffprobe report</title>" in handle.read(4096)
    except OSError:
        return False
