"""Built-in trainers for stability studies: `train(config) -> model` callables.

A trainer reads what it varies from `config` (missing keys take the defaults below) and must be
deterministic given it: `seed` (initialisation), `data_order` (shuffling), `bootstrap` (None, or
the seed of a resample of the training set drawn with replacement), `lr`, `momentum`, `epochs`,
and any key of the user's own. It may expose `heldout()` (inputs to compare members on) and
`architecture(config)` (an untrained model of the same shape, so saved members can be reloaded).
"""
import torch
from torch import nn

from .demo import digits_data, digits_mlp

DIGITS_DEFAULTS = {"seed": 0, "data_order": 0, "bootstrap": None, "lr": 0.05, "momentum": 0.9,
                   "epochs": 15, "hidden": 32, "batch": 64}


def bootstrap_indices(n, seed):
    """A resample of range(n) with replacement, or all of it when seed is None."""
    if seed is None:
        return torch.arange(n)
    return torch.randint(n, (n,), generator=torch.Generator().manual_seed(int(seed)))


def sgd(model, x, y, config, recorder=None, opt=None):
    """Plain minibatch SGD with momentum on cross-entropy; `recorder(model)` after each epoch.
    A caller that trains in several calls (a learning-rate schedule) passes its `opt`, so the
    momentum carries over; its learning rate is set to config["lr"]."""
    order_gen = torch.Generator().manual_seed(int(config["data_order"]))
    if opt is None:
        opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    for group in opt.param_groups:
        group["lr"] = config["lr"]
    for _ in range(int(config["epochs"])):
        model.train()
        for idx in torch.randperm(len(x), generator=order_gen).split(int(config["batch"])):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if recorder is not None:
            recorder(model.eval())
    return model.eval()


def digits(config=None):
    """A 64-32-32-10 ReLU classifier of sklearn's 8x8 digits, trained in about a second."""
    config = {**DIGITS_DEFAULTS, **(config or {})}
    x, y, _, _ = digits_data(0)
    keep = bootstrap_indices(len(x), config["bootstrap"])
    return sgd(digits_architecture(config), x[keep], y[keep], config)


def digits_architecture(config=None):
    config = {**DIGITS_DEFAULTS, **(config or {})}
    return digits_mlp(int(config["hidden"]), int(config["seed"]))


def digits_heldout():
    return digits_data(0)[2]


# the trainer protocol's optional parts are attributes of the function
vars(digits).update(heldout=digits_heldout, architecture=digits_architecture, defaults=DIGITS_DEFAULTS)
