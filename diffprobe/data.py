"""Read arrays (region centres, data points, labels) from .npy, .npz, .pt (weights-only) and
safetensors files, the format told by content."""
import zipfile
from pathlib import Path

import torch

from .errors import DataError


def read_head(path, size, error=DataError):
    """The first `size` bytes of a file; a missing, unreadable or empty file raises `error`."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(size)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise error(f"{path} is empty")
    return head


def load_tensor(path, key=None):
    """The tensor stored in `path` (for multi-array files, `key` or the first/only 'x'-like entry)."""
    path = Path(path)
    head = read_head(path, 8)
    try:
        if head.startswith(b"\x93NUMPY"):
            import numpy as np
            array = np.load(path, allow_pickle=False)
            return _checked(torch.from_numpy(array), path)
        if head.startswith(b"PK") and _is_npz(path):
            import numpy as np
            with np.load(path, allow_pickle=False) as arrays:
                return _checked(torch.from_numpy(arrays[_pick(list(arrays.keys()), key, path)]), path)
        if head.startswith(b"PK") or head[:1] == b"\x80":
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file
            obj = load_file(str(path))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npy/.npz/.pt/safetensors array file ({exc})") from exc
    if isinstance(obj, dict):
        obj = obj[_pick(list(obj), key, path)]
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a tensor")
    return _checked(obj, path)


def _is_npz(path):
    with zipfile.ZipFile(path) as archive:
        return all(n.endswith(".npy") for n in archive.namelist())


def _pick(keys, key, path):
    if key is not None:
        if key not in keys:
            raise DataError(f"{path} has no array '{key}'; it has {', '.join(keys)}")
        return key
    for name in ("x", "X", "inputs", "data", "center"):
        if name in keys:
            return name
    if len(keys) == 1:
        return keys[0]
    raise DataError(f"{path} holds several arrays ({', '.join(keys)}); name one with a key")


def _checked(t, path):
    if t.numel() == 0:
        raise DataError(f"{path} holds an empty array")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"{path} contains NaN or infinite values; clean the data first")
    return t.to(torch.float64) if t.is_floating_point() else t
