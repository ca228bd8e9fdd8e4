"""Capability and alignment of an optimiser, from its training trajectory.

For gradient descent on a base objective L over T recorded steps:
    capability       C      = (1/T) sum_t (L(theta_0) - L(theta_t))
    mesa capability  C_mesa = the same for G(theta) = ||grad L(theta)||, the optimiser's "true"
                              objective (what gradient descent actually drives to zero)
    alignment        alpha  = C / C_mesa
Capability is robust under a perturbation delta (data resample, initialisation) when
|C(O + delta) - C(O)| is small, and generalises when it holds for a perturbed objective (here: the
same loss on held-out data).
"""
import math
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .errors import DiffprobeError
from .results import CapabilityStudy, provenance


class CapabilityRecorder:
    """Records L(theta_t) and ||grad L(theta_t)|| of a full-batch objective; call it with the model
    at each step (or epoch) of any PyTorch loop, before the first update included.

        recorder = CapabilityRecorder(lambda m: F.cross_entropy(m(x), y))
        recorder(model)
        for ...: ...; opt.step(); recorder(model)
    """

    def __init__(self, objective: Callable[[nn.Module], torch.Tensor],
                 heldout_objective: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> None:
        self.objective, self.heldout_objective = objective, heldout_objective
        self.losses: List[float] = []
        self.grad_norms: List[float] = []
        self.heldout_losses: List[float] = []

    def __call__(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = self.objective(model)
        grads = torch.autograd.grad(loss, params)
        self.losses.append(loss.item())
        self.grad_norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)))
        if self.heldout_objective is not None:
            with torch.no_grad():
                self.heldout_losses.append(self.heldout_objective(model).item())

    def summary(self) -> Dict[str, Any]:
        return trajectory_summary(self.losses, self.grad_norms, self.heldout_losses or None)


def capability_of(values):
    """(1/T) sum_{t=1..T} (v_0 - v_t) for a recorded trajectory v_0..v_T."""
    if len(values) < 2:
        raise DiffprobeError("capability needs a trajectory of at least two recorded steps")
    return sum(values[0] - v for v in values[1:]) / (len(values) - 1)


def trajectory_summary(losses, grad_norms, heldout_losses=None):
    c, c_mesa = capability_of(losses), capability_of(grad_norms)
    return {"capability": c, "mesa_capability": c_mesa,
            "alignment": c / c_mesa if c_mesa != 0 else float("inf") * (1 if c >= 0 else -1),
            "heldout_capability": capability_of(heldout_losses) if heldout_losses else None,
            "losses": list(losses), "grad_norms": list(grad_norms),
            "heldout_losses": list(heldout_losses) if heldout_losses else None}


def capability(run: Callable[[Dict[str, Any]], CapabilityRecorder], optimisers: Dict[str, Dict[str, Any]],
               perturbations: Optional[Dict[str, Dict[str, Any]]] = None, *, seed: int = 0) -> CapabilityStudy:
    """Capability, mesa capability and alignment of each optimiser, and their robustness.

    `run(config) -> CapabilityRecorder` trains once and returns its recorder; `optimisers` maps a
    name to a config; `perturbations` maps a name to config changes (e.g. {"bootstrap": 1}) applied
    on top of each optimiser's config. Returns a `CapabilityStudy`.
    """
    t0 = time.perf_counter()
    perturbations = perturbations or {}
    out = {}
    for name, config in optimisers.items():
        entry = run(dict(config)).summary()
        entry["config"] = dict(config)
        entry["robustness"], entry["mesa_robustness"] = {}, {}
        for pname, delta in perturbations.items():
            other = run({**config, **delta}).summary()
            entry["robustness"][pname] = abs(other["capability"] - entry["capability"])
            entry["mesa_robustness"][pname] = abs(other["mesa_capability"] - entry["mesa_capability"])
        out[name] = entry
    return CapabilityStudy(optimisers=out, perturbations={k: dict(v) for k, v in perturbations.items()},
                           seconds=time.perf_counter() - t0, provenance=provenance(seed))
