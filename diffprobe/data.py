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
            if key is not None:
                raise DataError(f"{path} holds one array, not a named '{key}'")
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
    elif key is not None:
        raise DataError(f"{path} holds one array, not a named '{key}'")
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
    points = [k for k in keys if k not in _LABEL_KEYS]
    if len(points) == 1:
        return points[0]
    raise DataError(f"{path} holds several arrays ({', '.join(keys)}); name one with a key")


def _checked(t, path):
    if t.numel() == 0:
        raise DataError(f"{path} holds an empty array")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"{path} contains NaN or infinite values; clean the data first")
    return t.to(torch.float64) if t.is_floating_point() else t


_LABEL_KEYS = ("y", "Y", "labels", "label", "targets")


def load_points(path):
    """(points, labels, sources) from a data file or folder.

    An array file gives points [n, ...] and, for .npz/.pt/safetensors holding a 'y'/'labels'
    entry, their labels; a .vnnlib file or a folder of them gives one box region each (sources
    are the file names); a folder of array files gives their points concatenated.
    """
    from .regions import box_from_vnnlib
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path} is an empty folder; put data files or .vnnlib files in it")
        vnnlib = [p for p in files if p.suffix == ".vnnlib"]
        if vnnlib:
            return [box_from_vnnlib(p) for p in vnnlib], None, [p.name for p in vnnlib]
        parts = [load_points(p) for p in files]
        labels = [p[1] for p in parts]
        labels = torch.cat(labels) if all(lab is not None for lab in labels) else None
        return torch.cat([p[0] for p in parts]), labels, None
    if path.suffix == ".vnnlib":
        return [box_from_vnnlib(path)], None, [path.name]
    return load_tensor(path), _labels_in(path), None


def _labels_in(path):
    """The labels stored next to the points in a multi-array file, if any."""
    for key in _LABEL_KEYS:
        try:
            return load_tensor(path, key).reshape(-1).long()
        except DataError:
            continue
    return None


def as_points(data, labels=None):
    """(points tensor or list of regions, labels or None, source names or None) from an array,
    a list of points or regions, or a data file or folder (see `load_points`)."""
    sources = None
    if isinstance(data, (str, Path)):
        data, file_labels, sources = load_points(data)
        labels = file_labels if labels is None else labels
    if isinstance(data, (list, tuple)) and data and not isinstance(data[0], (int, float)):
        if all(hasattr(r, "bounding_box") for r in data):
            return list(data), _labels(labels, len(data)), sources
        data = torch.stack([torch.as_tensor(p) for p in data])
    points = torch.as_tensor(data)
    if points.dim() == 0 or len(points) == 0:
        raise DataError("the data holds no points; give an array of shape [n, *input shape]")
    if points.is_floating_point() and not bool(torch.isfinite(points).all()):
        raise DataError("the data contains NaN or infinite values; clean it first")
    return points.to(torch.float64), _labels(labels, len(points)), sources


def _labels(labels, n):
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1).long()
    if len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} points; give one label per point")
    return labels
