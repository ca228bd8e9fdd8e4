"""Trainer stability: train an ensemble that varies one axis at a time, measure how far apart the
members land in function space, and rank the axes by that spread.

Distances between two members on held-out data: sampled KL / JS / top-1 disagreement (the usual
average-case proxies), and what diffprobe adds: the worst case found by search and the certified
bound over small balls around held-out points. Structural stability asks the same of one model
under perturbations of its own parameters (dropout masks, DropConnect, Gaussian weight noise).
"""
import copy
import itertools
import json
import math
import re
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .data import load_points
from .differences import DIFFERENCES
from .errors import DataError, DiffprobeError
from .loading import resolve_callable
from .progress import progress_bar
from .results import Spread, StabilityStudy, StructuralStability, provenance

AXES = ("seed", "data_order", "bootstrap", "lr", "momentum")
SAMPLED = ("kl", "js", "disagreement")
WORST = ("found", "certified")


def axis_values(axis, members, base):
    """The values one axis takes across `members` members, everything else at `base`."""
    if isinstance(axis, tuple):  # user-defined: (name, [values]), one member per value
        return list(axis[1])
    if axis in ("seed", "data_order"):
        return [int(base.get(axis) or 0) + i for i in range(members)]
    if axis == "bootstrap":
        return list(range(members))
    if axis in ("lr", "momentum") and base.get(axis) is None:
        # perturbing around a made-up value would answer another question than the user's
        raise DiffprobeError(f"the {axis} axis perturbs the trainer's own {axis}, which diffprobe does not know: "
                             f"give base={{'{axis}': ...}} or a `defaults` dict on the trainer")
    if axis == "lr":  # log-spaced within +-20 % of the trainer's own: "slightly different hyperparameters"
        lr = float(base["lr"])
        return [lr * math.exp(0.2 * (2 * i / max(members - 1, 1) - 1)) for i in range(members)]
    if axis == "momentum":
        m = float(base["momentum"])
        return [min(max(m + 0.05 * (2 * i / max(members - 1, 1) - 1), 0.0), 0.99) for i in range(members)]
    raise DiffprobeError(f"unknown axis '{axis}'; use {', '.join(AXES)} or give (name, [values]) "
                         "for one of your trainer's own config keys")


def _axis_name(axis):
    return axis[0] if isinstance(axis, tuple) else axis


def _train_member(trainer, config):
    """Executor job: one trained member (the trainer is a callable or 'module:function')."""
    train = resolve_callable(trainer, "trainer") if isinstance(trainer, str) else trainer
    torch.manual_seed(0)  # trainers that forget to seed still get the same member twice
    model = train(dict(config))
    if not isinstance(model, nn.Module):
        raise DiffprobeError(f"the trainer returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


_MEMBERS_MARKER = ".diffprobe-members"
_MEMBER_FILE = re.compile(r"[0-9a-f]{16}\.safetensors")


def members_folder(folder, fresh):
    """The folder of a study's trained members, made with a marker file; an existing folder must
    carry that marker (diffprobe made it). `fresh`: the members saved there before are removed, and
    nothing else (only files named as members, no link followed)."""
    from .errors import OutputError
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{folder} exists and is not a folder diffprobe made; remove it or write the study elsewhere")
    if not folder.exists():
        folder.mkdir()
        (folder / _MEMBERS_MARKER).write_text("trained members of a diffprobe stability study\n")
        return folder
    if not (folder / _MEMBERS_MARKER).is_file():
        raise OutputError(f"{folder} was not made by diffprobe; remove it or write the study elsewhere")
    if fresh:
        for path in folder.iterdir():
            if _MEMBER_FILE.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                path.unlink()
    return folder


class _MemberStore:
    """Trained members by config, saved as safetensors beside the study when the trainer can
    rebuild its architecture (so an interrupted study resumes without retraining)."""

    def __init__(self, folder, rebuild):
        self.folder, self.rebuild = (Path(folder) if folder else None), rebuild
        self.models = {}
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key):
        import hashlib
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".safetensors")

    def get(self, key, config):
        if key in self.models:
            return self.models[key]
        path = self._path(key) if self.folder else None
        if path is not None and self.rebuild and path.is_file() and not path.is_symlink():
            from safetensors.torch import load_file
            model = self.rebuild(dict(config))
            model.load_state_dict(load_file(str(self._path(key))))
            self.models[key] = model.eval()
        return self.models.get(key)

    def put(self, key, model):
        self.models[key] = model
        if self.folder and self.rebuild:
            from safetensors.torch import save
            from .outputs import write_bytes
            write_bytes(self._path(key), save({k: v.contiguous() for k, v in model.state_dict().items()}))


def _resolved(trainer):
    return resolve_callable(trainer, "trainer") if isinstance(trainer, str) else trainer


def stability(trainer: Union[str, Callable[[dict], nn.Module]], *,
              axes: Sequence[Union[str, Tuple[str, Sequence[Any]]]] = ("seed", "bootstrap", "lr"),
              members: int = 4, base: Optional[Mapping[str, Any]] = None,
              heldout: Union[None, str, Path, torch.Tensor] = None, eps: float = 0.05,
              norm: Union[str, float] = "inf", clip: Optional[Tuple[float, float]] = (0.0, 1.0),
              regions: int = 5, worst_case: bool = True, search_steps: int = 30, rank_by: str = "js",
              executor: Optional[Executor] = None, members_dir: Union[None, str, Path] = None,
              seed: int = 0, progress: bool = False) -> StabilityStudy:
    """Train `members` members per axis (varying only that axis from `base`) and measure them.

    `trainer`: `train(config) -> model`, or 'module:function'. `heldout`: inputs to compare on
    (a tensor or a data file), else the trainer's `heldout()`. The worst-case distances use L-inf
    (or L2) balls of radius `eps` around the first `regions` held-out points; `worst_case=False`
    skips them. `members_dir` keeps trained members (safetensors) so a rerun resumes.
    Returns a `StabilityStudy`.
    """
    t0 = time.perf_counter()
    if members < 2:
        raise DiffprobeError(f"a study needs at least 2 members per axis (got {members})")
    train = _resolved(trainer)
    base = {**getattr(train, "defaults", {}), **(base or {})}
    x = _heldout(heldout, train)
    axes = [a if isinstance(a, str) else (a[0], a[1]) for a in axes]
    plan = {_axis_name(a): [{**base, _axis_name(a): v} for v in axis_values(a, members, base)] for a in axes}
    store = _MemberStore(members_dir, getattr(train, "architecture", None))
    notes: List[str] = []
    models = _train_all(trainer, train, plan, store, executor, progress, notes)
    result = {}
    with progress_bar(progress, len(plan), desc="distances") as bar:
        for name, configs in plan.items():
            ms = [models[_key(c)] for c in configs]
            result[name] = _distances(ms, x, eps, norm, clip, regions if worst_case else 0, search_steps, seed)
            bar.update(1)
    spread = {name: {metric: _bootstrap_mean(m, seed) for metric, m in d.items()} for name, d in result.items()}
    if rank_by not in SAMPLED + WORST:
        raise DiffprobeError(f"rank_by must be one of {', '.join(SAMPLED + WORST)}")
    ranking = sorted(spread, key=lambda a: -spread[a][rank_by].mean if rank_by in spread[a] else 1)
    return StabilityStudy(
        axes=list(plan), members=members, base=_jsonable(base),
        values={n: [c[n] for c in cs] for n, cs in plan.items()}, distances=result, spread=spread,
        ranking=ranking, rank_by=rank_by, eps=eps, norm=str(norm), regions=regions if worst_case else 0,
        seconds=time.perf_counter() - t0, notes=notes, provenance=provenance(seed))


def _key(config):
    return json.dumps(_jsonable(config), sort_keys=True)


def _jsonable(config):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in config.items()}


def _heldout(heldout, train):
    if heldout is None:
        if not hasattr(train, "heldout"):
            raise DataError("give held-out inputs (heldout=...); this trainer has no heldout()")
        heldout = train.heldout()
    if isinstance(heldout, (str, Path)):
        heldout = load_points(heldout)[0]
    x = torch.as_tensor(heldout).to(torch.float64)
    if not len(x):
        raise DataError("the held-out data holds no points")
    return x


def _train_all(trainer, train, plan, store, executor, progress, notes):
    """Every distinct member once (configs shared between axes are trained once): here with the
    resolved `train`, or through the executor with `trainer` as given (a 'module:function' string
    travels to worker processes where a function defined in a file might not)."""
    configs = {_key(c): c for cs in plan.values() for c in cs}
    todo = {k: c for k, c in configs.items() if store.get(k, c) is None}
    if len(todo) < len(configs):
        notes.append(f"{len(configs) - len(todo)} of {len(configs)} members reloaded from the members folder")
    with progress_bar(progress, len(todo), desc="training") as bar:
        if executor is None:
            for k, c in todo.items():
                store.put(k, _train_member(train, c))
                bar.update(1)
        else:
            import concurrent.futures
            futures = {executor.submit(_train_member, trainer, c): k for k, c in todo.items()}
            for future in concurrent.futures.as_completed(futures):
                store.put(futures[future], future.result())
                bar.update(1)
    return {k: store.get(k, c) for k, c in configs.items()}


@torch.no_grad()
def _outputs(model, x):
    return model(x.to(_dtype(model))).double().reshape(len(x), -1)


def _sampled(a, b):
    """Average-case distances between two members' outputs on the same held-out inputs."""
    return {"kl": DIFFERENCES["kl"](a, b).mean().item(), "js": DIFFERENCES["js"](a, b).mean().item(),
            "disagreement": (a.argmax(1) != b.argmax(1)).double().mean().item()}


def _dtype(model):
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _distances(models, x, eps, norm, clip, regions, search_steps, seed):
    """Pairwise distance matrices [members x members] per metric (KL is asymmetric)."""
    n = len(models)
    out = {m: [[0.0] * n for _ in range(n)] for m in SAMPLED + (WORST if regions else ())}
    centers = x[:regions].reshape(regions, -1) if regions else None
    outputs = [_outputs(m, x) for m in models]
    for i, j in itertools.permutations(range(n), 2):
        for metric, value in _sampled(outputs[i], outputs[j]).items():
            out[metric][i][j] = value
        if regions and i < j:
            worst = _worst_case(models[i], models[j], centers, eps, norm, clip, search_steps, seed)
            out["found"][i][j] = out["found"][j][i] = worst["found"]
            out["certified"][i][j] = out["certified"][j][i] = worst["certified"]
    return out


def _worst_case(a, b, centers, eps, norm, clip, search_steps, seed):
    """The largest difference found by search and the certified bound over balls around `centers`."""
    from ._drift import drift
    report = drift(a, b, centers, eps=eps, norm=norm, clip=clip, search_steps=search_steps,
                   search_restarts=4, seed=seed)
    return {"found": report.found, "certified": report.bound}


def _bootstrap_mean(matrix, seed, resamples=1000):
    """Mean off-diagonal distance with a 95 % bootstrap interval over members."""
    m = torch.tensor(matrix, dtype=torch.float64)
    n = len(m)
    off = ~torch.eye(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(resamples):
        pick = torch.randint(n, (n,), generator=gen)
        sub = m[pick][:, pick]
        distinct = pick[:, None] != pick[None, :]  # a member resampled twice is no pair
        if distinct.any():
            means.append(sub[distinct].mean().item())
    means = torch.tensor(means, dtype=torch.float64)
    return Spread(m[off].mean().item(), means.quantile(0.025).item() if len(means) else float("nan"),
                  means.quantile(0.975).item() if len(means) else float("nan"))


# ---- structural stability of one model ----------------------------------------------------------

def perturbed(model, kind, scale, generator):
    """A copy of `model` with its parameters perturbed: `dropout` (hidden units of Linear layers
    dropped with probability `scale`, survivors scaled by 1/(1-p), i.e. one dropout mask frozen),
    `dropconnect` (single weights dropped likewise) or `noise` (W * (1 + scale * N(0, 1)))."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        linears = [m for m in other.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        for index, layer in enumerate(linears):
            w = layer.weight
            if kind == "noise":
                w.mul_(1 + scale * torch.randn(w.shape, generator=generator, dtype=w.dtype))
            elif kind == "dropconnect":
                keep = (torch.rand(w.shape, generator=generator) >= scale).to(w.dtype)
                w.mul_(keep / (1 - scale))
            elif kind == "dropout":
                if index == 0:
                    continue  # inputs are not dropped; a unit's drop zeroes its outgoing weights
                keep = (torch.rand(w.shape[1], generator=generator) >= scale).to(w.dtype)
                w.mul_(keep.reshape(1, -1, *[1] * (w.dim() - 2)) / (1 - scale))
            else:
                raise DiffprobeError(f"unknown perturbation '{kind}'; use dropout, dropconnect or noise")
    return other


def structural_stability(model: nn.Module, heldout: torch.Tensor, *,
                         kinds: Sequence[str] = ("dropout", "dropconnect", "noise"),
                         scales: Sequence[float] = (0.01, 0.02, 0.05, 0.1), samples: int = 3,
                         eps: float = 0.05, norm: Union[str, float] = "inf",
                         clip: Optional[Tuple[float, float]] = (0.0, 1.0), regions: int = 5,
                         search_steps: int = 30, seed: int = 0, progress: bool = False) -> StructuralStability:
    """Drift of `model` against perturbed copies of itself, per perturbation kind and scale:
    sampled KL / disagreement on `heldout`, and the worst case found and certified over balls
    around the first `regions` held-out points (mean over `samples` perturbed copies)."""
    t0 = time.perf_counter()
    x = torch.as_tensor(heldout).to(torch.float64)
    centers = x[:regions].reshape(regions, -1) if regions else None
    reference = _outputs(model, x)
    gen = torch.Generator().manual_seed(seed)

    def measured(other):
        v = _sampled(reference, _outputs(other, x))
        return {**v, **_worst_case(model, other, centers, eps, norm, clip, search_steps, seed)} if regions else v

    curves: Dict[str, List[dict]] = {kind: [] for kind in kinds}
    with progress_bar(progress, len(kinds) * len(scales), desc="structural") as bar:
        for kind, scale in itertools.product(kinds, scales):
            values = [measured(perturbed(model, kind, scale, gen)) for _ in range(samples)]
            curves[kind].append({"scale": scale, **{k: sum(v[k] for v in values) / samples for k in values[0]}})
            bar.update(1)
    return StructuralStability(kinds=list(kinds), scales=list(scales), samples=samples, curves=curves,
                               eps=eps, regions=regions, seconds=time.perf_counter() - t0,
                               provenance=provenance(seed))
