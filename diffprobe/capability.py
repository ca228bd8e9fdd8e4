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
import time

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

    def __init__(self, objective, heldout_objective=None):
        self.objective, self.heldout_objective = objective, heldout_objective
        self.losses, self.grad_norms, self.heldout_losses = [], [], []

    def __call__(self, model):
        params = [p for p in model.parameters() if p.requires_grad]
        loss = self.objective(model)
        grads = torch.autograd.grad(loss, params)
        self.losses.append(loss.item())
        self.grad_norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item())
        if self.heldout_objective is not None:
            with torch.no_grad():
                self.heldout_losses.append(self.heldout_objective(model).item())

    def summary(self):
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


def capability(run, optimisers, perturbations=None, *, seed=0):
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


def digits_run(config):
    """The built-in small real problem: the digits MLP trained by minibatch SGD, recording the
    full training loss and its gradient norm each epoch (and the held-out loss).

    Config: seed, data_order, bootstrap, lr, momentum, epochs, hidden, batch (see
    diffprobe.trainers), `decay` (True: the learning rate decays as lr / (1 + 0.3 epoch)) and
    `init_scale` (initial weights multiplied by it)."""
    from .demo import digits_data
    from .trainers import DIGITS_DEFAULTS, bootstrap_indices, digits_architecture, sgd
    config = {**DIGITS_DEFAULTS, "decay": True, "momentum": 0.0, **config}
    x, y, x_test, y_test = digits_data(0)
    keep = bootstrap_indices(len(x), config["bootstrap"])
    x, y = x[keep], y[keep]
    model = digits_architecture(config)
    with torch.no_grad():  # init_scale > 1 starts off the flat region around a uniform prediction
        for p in model.parameters():
            p.mul_(float(config.get("init_scale", 1.0)))
    recorder = CapabilityRecorder(lambda m: nn.functional.cross_entropy(m(x), y),
                                  lambda m: nn.functional.cross_entropy(m(x_test), y_test))
    recorder(model.eval())
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    for epoch in range(int(config["epochs"])):
        lr = config["lr"] / (1 + 0.3 * epoch) if config["decay"] else config["lr"]
        sgd(model, x, y, {**config, "lr": lr, "epochs": 1, "data_order": int(config["data_order"]) * 1000 + epoch},
            recorder, opt)
    return recorder


# the example's optimisers: A and B differ only in initialisation (different basins); C is A with a
# constant step size, which on this problem orbits instead of converging (measured: README)
_SHARED = {"lr": 1.0, "epochs": 30, "init_scale": 3.0}
ABC = {"A": {**_SHARED, "seed": 0, "decay": True},
       "B": {**_SHARED, "seed": 1, "decay": True},
       "C": {**_SHARED, "seed": 0, "decay": False}}
PERTURBATIONS = {"bootstrap": {"bootstrap": 1}, "data_order": {"data_order": 1}}
