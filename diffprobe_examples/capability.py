"""The capability example: the digits MLP trained by three optimisers (A and B differ only in their
initialisation, C keeps a constant step), recorded with `diffprobe.CapabilityRecorder`."""
import torch
from torch import nn

from diffprobe import CapabilityRecorder


def digits_run(config):
    """The built-in small real problem: the digits MLP trained by minibatch SGD, recording the
    full training loss and its gradient norm each epoch (and the held-out loss).

    Config: seed, data_order, bootstrap, lr, momentum, epochs, hidden, batch (see
    diffprobe_examples.trainers), `decay` (True: the learning rate decays as lr / (1 + 0.3 epoch)) and
    `init_scale` (initial weights multiplied by it)."""
    from diffprobe_examples.demo import digits_data
    from diffprobe_examples.trainers import DIGITS_DEFAULTS, bootstrap_indices, digits_architecture, sgd
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
