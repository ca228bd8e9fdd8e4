"""Checkpoints that hold a model in pieces: pruning reparametrisations (`weight_orig` and
`weight_mask`, saved when `torch.nn.utils.prune.remove` was not called) and LoRA factors (peft
adapter folders, or full state_dicts of an unmerged peft model), folded into plain weights as the
model computes them: W = W_orig * mask, and W = W_base + scaling * B @ A (peft's merge_and_unload;
scaling = lora_alpha / r, or / sqrt(r) with rsLoRA)."""
import copy
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import CheckpointError

_LORA = re.compile(r"^(?P<prefix>.*)\.lora_(?P<part>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."


def folded(state, path, config=None):
    """`state` with pruning masks applied and LoRA factors merged into the weights they adapt."""
    metadata = getattr(state, "_metadata", None)  # module versions: a quantised Linear needs them
    state = _pruned(state)
    if any(_LORA.match(k) for k in state):
        state = _merged(state, path, config if config is not None else _config_beside(path))
    if metadata is not None:
        state._metadata = metadata
    return state


def _pruned(state):
    out = OrderedDict((k, v) for k, v in state.items())
    for key in [k for k in state if k.endswith("_orig")]:
        mask = key[:-len("_orig")] + "_mask"
        if mask in state:
            out[key[:-len("_orig")]] = state[key] * state[mask]
            del out[key], out[mask]
    return out


def _config_beside(path):
    config = Path(path).parent / "adapter_config.json" if path else None
    return _read_config(config) if config is not None and config.is_file() else None


def _read_config(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable adapter configuration ({exc})") from exc


def _scaling(config, rank, prefix, state, path):
    if f"{prefix}.scaling" in state:  # implementations that keep it beside the factors
        return float(state[f"{prefix}.scaling"])
    if config is None:
        raise CheckpointError(f"{path} holds LoRA factors but not their scaling; give the adapter folder (with "
                              "adapter_config.json), or save the model after merge_and_unload()")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if config.get(unsupported):
            raise CheckpointError(f"{path}: LoRA with {unsupported} is not merged by diffprobe; merge it with peft "
                                  "(merge_and_unload) and save the merged model")
    alpha = config.get("alpha_pattern", {}).get(prefix.split(".")[-1], config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _merged(state, path, config):
    factors = {}
    for key, value in state.items():
        match = _LORA.match(key)
        if match:
            factors.setdefault(match["prefix"], {})[match["part"]] = value
    out = OrderedDict((k, v) for k, v in state.items() if not _LORA.match(k))
    for prefix, parts in factors.items():
        if set(parts) != {"A", "B"} or parts["A"].dim() != 2:
            raise CheckpointError(f"{path}: the LoRA factors of {prefix} are incomplete or not of a Linear layer")
        base = prefix + (".base_layer" if f"{prefix}.base_layer.weight" in state else "")
        if f"{base}.weight" not in state:
            raise CheckpointError(f"{path}: LoRA factors for {prefix}, but no weight of that layer to merge them into")
        weight = state[f"{base}.weight"]
        scale = _scaling(config, parts["A"].shape[0], prefix, state, path)
        delta = scale * parts["B"].double() @ parts["A"].double()
        out.pop(f"{base}.weight", None)
        out[f"{prefix}.weight"] = (weight.double() + delta).to(weight.dtype)
        if f"{base}.bias" in state and base != prefix:
            out[f"{prefix}.bias"] = out.pop(f"{base}.bias")
    return OrderedDict((k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k, v) for k, v in out.items())


def is_adapter(path):
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def with_adapter(base, folder):
    """A copy of `base` with the peft adapter in `folder` merged into its weights."""
    folder = Path(folder)
    config = _read_config(folder / "adapter_config.json")
    weights = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder} has no adapter_model.safetensors (or .bin)")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        factors = load_file(str(weights))
    else:
        factors = torch.load(str(weights), map_location="cpu", weights_only=True)
    model = copy.deepcopy(base)
    state = {**model.state_dict(), **{(k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k): v
                                      for k, v in factors.items()}}
    merged = _merged(state, folder, config)
    missing = sorted(set(merged) - set(model.state_dict()))
    if missing:
        raise CheckpointError(f"{folder}: the adapter targets {missing[:3]}, which the base model does not have")
    model.load_state_dict(merged, assign=True)
    return model.eval()
