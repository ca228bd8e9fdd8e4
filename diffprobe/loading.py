"""Load a model from a file, the format told by the file's content rather than its extension.

Safe by default: state_dicts load with `weights_only=True`; anything that can run code when
loaded (a pickled module, a torch.export `.pt2`) needs `trust=True`.
"""
import importlib
import importlib.util
import json
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .data import read_head
from .errors import CheckpointError, DiffprobeError, UnsafeCheckpointError

_PREFIXES = ("model.", "module.", "net.", "network.", "_orig_mod.", "base_model.model.")


def sniff_format(path):
    """'onnx', 'nnet', 'safetensors', 'torch' (torch.save zip or legacy pickle), 'pt2', or 'adapter'
    (a peft adapter folder)."""
    path = Path(path)
    if path.is_dir():
        from .adapters import is_adapter
        if is_adapter(path):
            return "adapter"
        raise CheckpointError(f"{path} is a folder, not a model file or a peft adapter folder (adapter_config.json)")
    head = read_head(path, 4096, CheckpointError)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: a damaged or truncated archive ({exc}); save it again") from exc
        if any(n.endswith("archive_format") or "/models/" in n for n in names):
            return "pt2"
        return "torch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch"  # a legacy torch.save pickle: the PROTO opcode and a protocol torch writes
    if head[:2] == b"\x1f\x8b":
        return "onnx"  # gzipped, as VNN-COMP ships its networks
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    text = head.decode("ascii", errors="replace")
    lines = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("//")]
    if lines and all(p.strip().lstrip("-").isdigit() for p in lines[0].split(",") if p.strip()):
        return "nnet"
    if head[:1] == b"\x08":
        return "onnx"
    raise CheckpointError(
        f"{path}: unknown model format; diffprobe reads ONNX, NNet, safetensors, torch state_dicts "
        "(with arch=), and with trust=True pickled modules and torch.export .pt2 files")


def load_model(path: Union[str, Path], *, arch: Optional[str] = None,
               arch_kwargs: Union[None, str, Dict[str, Any]] = None, trust: bool = False, normalize: bool = False,
               base: Optional[nn.Module] = None) -> nn.Module:
    """The nn.Module stored in `path`, in eval mode, weights checked for NaN/inf.

    The module keeps the function stored: its parameters keep their dtype (an fp16 state_dict gives
    an fp16 module, an NNet file's decimal weights float64), quantised modules stay quantised.
    `arch` ("pkg.module:factory" or "path/file.py:factory") builds the architecture for a
    state_dict or safetensors file; `normalize` applies an NNet file's input/output scaling. A
    state_dict's pruning reparametrisations (weight_orig, weight_mask) and LoRA factors are folded
    into the weights; a peft adapter folder is merged into a copy of `base`.
    """
    kind = sniff_format(path)
    if kind == "adapter":
        if base is None:
            raise CheckpointError(f"{path} is a LoRA adapter: it needs the model it adapts (base=; on the "
                                  "command line, the adapter is MODEL_B and MODEL_A its base)")
        from .adapters import with_adapter
        model = with_adapter(base, path)
    elif kind == "onnx":
        model = _load_onnx(path)
    elif kind == "nnet":
        from .nnet import read_nnet
        model = read_nnet(path, normalize=normalize)
    elif kind == "pt2":
        model = _load_pt2(path, trust)
    else:
        model = _load_weights(path, kind, arch, arch_kwargs, trust)
    try:
        model.eval()
    except NotImplementedError:  # torch.export modules are already in inference form
        pass
    check_finite(model, path)
    return model


def check_finite(model, name="model"):
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and type(t) in (torch.Tensor, nn.Parameter) and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{name}: NaN or infinite values in {', '.join(bad)}; the checkpoint is corrupt")


def onnx_proto(path: Union[str, Path]):
    """The ModelProto of an ONNX file (gzipped or not)."""
    import onnx
    return onnx.load_from_string(_gunzipped(path)) if _is_gzip(path) else onnx.load(str(path))


def _load_onnx(path):
    try:
        import onnx
    except ImportError as exc:
        raise CheckpointError("reading ONNX needs the onnx package: pip install 'diffprobe[onnx]'") from exc
    from .onnx_import import onnx_to_torch
    try:
        proto = onnx_proto(path)
    except CheckpointError:
        raise
    except Exception as exc:  # onnx raises DecodeError and friends
        raise CheckpointError(f"{path}: not a readable ONNX file ({exc})") from exc
    try:
        return onnx_to_torch(proto)
    except DiffprobeError:
        raise
    except Exception as exc:  # a malformed graph (missing attributes, dangling names)
        raise CheckpointError(f"{path}: malformed ONNX graph ({type(exc).__name__}: {exc})") from exc


MAX_GUNZIPPED = 2 << 30


def _is_gzip(path):
    return read_head(path, 2, CheckpointError) == b"\x1f\x8b"


def _gunzipped(path):
    """The content of a gzipped file, refused beyond 2 GB (a small file can inflate to anything)."""
    import gzip
    with gzip.open(path, "rb") as handle:
        data = handle.read(MAX_GUNZIPPED + 1)
    if len(data) > MAX_GUNZIPPED:
        raise CheckpointError(f"{path} inflates to more than {MAX_GUNZIPPED >> 30} GB; diffprobe reads smaller models")
    return data


def _load_pt2(path, trust):
    if not trust:
        raise UnsafeCheckpointError(
            f"{path} is a torch.export archive, and loading one can run arbitrary code "
            "(torch.export.load falls back to unrestricted unpickling); pass trust=True "
            "only if you trust its source, or save a state_dict / ONNX instead")
    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        raise CheckpointError(f"{path}: torch.export.load failed ({exc})") from exc


def _load_weights(path, kind, arch, arch_kwargs, trust):
    obj = _read_safetensors(path) if kind == "safetensors" else _read_torch(path, trust)
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, neither a module nor a state_dict")
    if arch is None:
        raise CheckpointError(
            f"{path} holds only weights (a state_dict); give the architecture with "
            "arch='module:factory' or arch='path/to/file.py:factory'")
    from .adapters import folded
    model = build_arch(arch, arch_kwargs)
    _load_state(model, folded(_state_dict_of(obj), path), path)
    return model


def _read_safetensors(path):
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError("reading safetensors needs: pip install safetensors") from exc
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_torch(path, trust):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects beyond tensors (e.g. a whole module), which can "
                "run arbitrary code when loaded; pass trust=True only if you trust its "
                "source, or save model.state_dict() instead") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    folder = str(Path(path).resolve().parent)  # a pickled module's class is often defined in a file beside it
    sys.path.insert(0, folder)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"{path}: the pickle's classes live in module '{exc.name}', which cannot be "
                              f"imported; put {exc.name}.py beside the checkpoint or on PYTHONPATH, or save "
                              "model.state_dict() and pass arch=") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: loading the trusted pickle failed ({exc})") from exc
    finally:
        sys.path.remove(folder)


def _state_dict_of(obj):
    """The tensors of a checkpoint; Lightning and training-loop dicts nest them one level down."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _load_state(model, state, path):
    """Load `state` into `model` as stored: tensors are assigned, not copied into the architecture's
    own (so an fp16 or float64 checkpoint keeps its dtype), and the non-tensor entries of quantised
    modules (packed weights, dtypes) are passed on."""
    expected = set(model.state_dict())
    for prefix in ("",) + _PREFIXES:
        stripped = _stripped(state, prefix)
        if set(stripped) == expected:
            try:
                model.load_state_dict(stripped, assign=True)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path} does not fit the architecture ({str(exc)[:300]}); check "
                                      "arch= and arch_kwargs=") from exc
            return
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    raise CheckpointError(
        f"{path} does not fit the architecture: missing {missing[:5]}, unexpected {extra[:5]}; "
        "check arch= and arch_kwargs=")


def _stripped(state, prefix):
    """`state` without `prefix` on its keys, keeping the module versions torch stores beside the
    tensors (a quantised Linear reads its version to know how its weights were saved)."""
    cut = lambda k: k[len(prefix):] if prefix and k.startswith(prefix) else k
    out = OrderedDict((cut(k), v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = type(metadata)((cut(k + ".")[:-1] if k else k, v) for k, v in metadata.items())
    return out


def resolve_callable(spec, option="arch"):
    """The object named by 'pkg.module:name' or 'path/file.py:name'. This runs the module's code:
    only name code you trust. A file may import modules beside it (its folder is searched first
    while it loads)."""
    where, _, name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not where or not name.isidentifier():
        raise CheckpointError(f"{option}='{spec}' must look like module:name or path/file.py:name")
    try:
        module = _module_at(where) if where.endswith(".py") else importlib.import_module(where)
        return getattr(module, name)
    except (ImportError, OSError, AttributeError) as exc:
        raise CheckpointError(f"{option}='{spec}': cannot find it ({exc})") from exc
    except SyntaxError as exc:
        raise CheckpointError(f"{option}='{spec}': {exc.filename} line {exc.lineno}: {exc.msg}") from exc
    except Exception as exc:  # the module's own code failed while loading
        raise CheckpointError(f"{option}='{spec}': loading it raised {type(exc).__name__}: {exc}") from exc


def _module_at(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def build_arch(spec, kwargs=None):
    """Call the factory named by 'pkg.module:factory' or 'path/file.py:factory' with `kwargs` (a
    dict or a JSON object)."""
    factory = resolve_callable(spec)
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError as exc:
            raise CheckpointError(f"arch_kwargs is not valid JSON ({exc}); give an object such as "
                                  "'{\"hidden\": 32}'") from exc
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CheckpointError(f"arch_kwargs must be a JSON object of keyword arguments, not {type(kwargs).__name__}")
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:  # wrong keyword arguments, or the factory's own error
        raise CheckpointError(f"arch='{spec}' failed with these arguments: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"arch='{spec}' returned a {type(model).__name__}, not an nn.Module")
    return model
