import concurrent.futures
import json
import multiprocessing

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import diffprobe as dp
from diffprobe import DiffprobeError
from diffprobe._capability import CapabilityRecorder, capability_of
from diffprobe_examples.capability import ABC, digits_run
from diffprobe.cli import main
from diffprobe._stability import axis_values, perturbed
from conftest import mlp

X = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + X[:, 1] > X[:, 2] + 0.5).long() + (X[:, 3] > 0.7).long()


def undeclared(config):
    """`tiny` without its defaults: diffprobe cannot know its learning rate."""
    return tiny(config)


TINY_DEFAULTS = {"seed": 0, "data_order": 0, "bootstrap": None, "lr": 0.5, "momentum": 0.0, "epochs": 5,
                 "batch": 16}


def tiny(config):
    """A 4-8-3 classifier of synthetic data, honouring seed / data_order / bootstrap / lr."""
    from diffprobe_examples.trainers import bootstrap_indices, sgd
    config = {**TINY_DEFAULTS, **config}
    keep = bootstrap_indices(len(X), config["bootstrap"])
    return sgd(mlp([4, 8, 3], int(config["seed"])), X[keep], Y[keep], config)


tiny.heldout = lambda: X[:32]
tiny.defaults = TINY_DEFAULTS
undeclared.heldout = tiny.heldout
tiny.architecture = lambda config: mlp([4, 8, 3], int(config.get("seed", 0)))


def test_the_lr_axis_perturbs_the_trainers_own_lr():
    with pytest.raises(DiffprobeError, match="the lr axis perturbs the trainer's own lr"):
        dp.stability(undeclared, axes=["lr"], members=2, heldout=X[:8], regions=0)
    study = dp.stability(undeclared, axes=["lr"], members=2, heldout=X[:8], regions=0, base={"lr": 0.003})
    assert study.base["lr"] == 0.003 and max(study.values["lr"]) < 0.004
    r = CliRunner().invoke(main, ["stability", "--trainer", f"{__file__}:undeclared", "--axes", "lr", "--members", "2",
                                  "--regions", "0", "--quiet", "--json", "--base", "lr=0.003"])
    assert r.exit_code == 0 and json.loads(r.stdout)["base"]["lr"] == 0.003
    missing = CliRunner().invoke(main, ["stability", "--trainer", f"{__file__}:undeclared", "--axes", "lr",
                                        "--members", "2", "--regions", "0", "--quiet"])
    assert missing.exit_code == 1 and "--base lr=" in missing.stderr


def test_axis_values_vary_one_thing():
    base = {"lr": 0.1, "momentum": 0.9, "seed": 3}
    assert axis_values("seed", 3, base) == [3, 4, 5]
    lrs = axis_values("lr", 5, base)
    assert lrs[2] == pytest.approx(0.1) and 0.08 < lrs[0] < lrs[-1] < 0.125
    assert axis_values("momentum", 3, base) == pytest.approx([0.85, 0.9, 0.95])
    assert axis_values(("width", [8, 16]), 4, base) == [8, 16]
    with pytest.raises(dp.DiffprobeError, match="unknown axis"):
        axis_values("colour", 3, base)


def test_study_distances_spread_and_ranking():
    study = dp.stability(tiny, axes=["seed", "lr", ("noop", [1, 1, 1])], members=3, eps=0.05, regions=2,
                         search_steps=10)
    noop = study.distances["noop"]
    assert all(v == 0 for row in noop["kl"] for v in row) and study.ranking[-1] == "noop"
    seed = study.distances["seed"]
    for i in range(3):
        assert seed["kl"][i][i] == 0 and seed["js"][i][i] == 0
        for j in range(3):
            assert seed["js"][i][j] == pytest.approx(seed["js"][j][i])
            assert seed["found"][i][j] <= seed["certified"][i][j] + 1e-9  # the witness never beats the bound
            if i != j:
                assert seed["certified"][i][j] > 0
    s = study.spread["seed"]["js"]
    assert isinstance(s, dp.Spread) and s.low <= s.high and s.mean > 0
    assert dp.StabilityStudy.from_json(study.to_json()) == study
    assert study.values["lr"][0] < study.values["lr"][-1]


def test_members_are_reused_and_pool_matches_serial(tmp_path):
    serial = dp.stability(tiny, axes=["seed"], members=3, regions=0, members_dir=tmp_path / "m")
    again = dp.stability(tiny, axes=["seed"], members=3, regions=0, members_dir=tmp_path / "m")
    assert "3 of 3 members reloaded" in again.notes[0] and again.distances == serial.distances
    trainer = f"{__file__}:tiny"
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel = dp.stability(trainer, axes=["seed"], members=3, regions=0, executor=pool)
    assert parallel.distances == serial.distances


def test_perturbations_of_one_model():
    model = mlp([6, 10, 10, 3], 0)
    gen = torch.Generator().manual_seed(0)
    dropped = perturbed(model, "dropout", 0.5, gen)
    w, w0 = dropped[2].weight, model[2].weight
    zero_cols = (w == 0).all(0)
    assert zero_cols.any() and torch.allclose(w[:, ~zero_cols], 2 * w0[:, ~zero_cols])
    assert torch.equal(dropped[0].weight, model[0].weight)  # inputs are never dropped
    assert torch.equal(perturbed(model, "noise", 0.0, gen)[0].weight, model[0].weight)
    curves = dp.structural_stability(model, torch.rand(20, 6), scales=(0.01, 0.2), samples=2, regions=2,
                                     search_steps=10)
    for rows in curves.curves.values():
        assert all(r["found"] <= r["certified"] + 1e-9 for r in rows)
    assert curves.curves["noise"][0]["certified"] < curves.curves["noise"][1]["certified"]


def test_capability_definitions_on_a_quadratic():
    assert capability_of([3.0, 2.0, 1.0]) == pytest.approx(1.5)
    theta = nn.Parameter(torch.tensor([3.0, 4.0]))
    model = nn.Module()
    model.theta = theta
    recorder = CapabilityRecorder(lambda m: (m.theta ** 2).sum())
    for _ in range(3):
        recorder(model)
        with torch.no_grad():
            theta.mul_(0.5)
    summary = recorder.summary()
    assert recorder.losses == pytest.approx([25, 6.25, 1.5625])
    assert recorder.grad_norms == pytest.approx([10, 5, 2.5])  # ||2 theta||
    assert summary["alignment"] == pytest.approx(summary["capability"] / summary["mesa_capability"])


def test_abc_optimisers_reproduce_the_example():
    study = dp.capability(digits_run, {k: {**v, "epochs": 15} for k, v in ABC.items()},
                          {"init": {"seed": 7}})
    a, b, c = (study.optimisers[k] for k in "ABC")
    # A and B differ only in initialisation: similar capability, different final loss (basin)
    assert abs(a["capability"] - b["capability"]) < 0.1 * a["capability"]
    assert a["losses"][-1] != b["losses"][-1]
    # C keeps its constant step: it orbits far from the minimum A converges to. The orbit is chaotic
    # (its last gradient norm depends on floating-point details), so only its level is asserted:
    # every one of its last five losses stays above five times A's final loss
    assert min(c["losses"][-5:]) > 5 * a["losses"][-1]
    assert set(a["robustness"]) == {"init"} and dp.CapabilityStudy.from_json(study.to_json()) == study


def test_stability_cli(tmp_path):
    args = ["stability", "--trainer", f"{__file__}:tiny", "--axes", "seed,lr", "--members", "2",
            "--regions", "1", "--quiet", "--json", "--out", str(tmp_path / "s.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["ranking"]) == {"seed", "lr"} and out["members"] == 2
    assert (tmp_path / "s.members").is_dir()
    again = CliRunner().invoke(main, args + ["--resume"])
    assert json.loads(again.stdout)["distances"] == out["distances"]
    page = CliRunner().invoke(main, ["report", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.html")])
    assert page.exit_code == 0 and (tmp_path / "s.html").read_text().count("<img") == 2
    bad = CliRunner().invoke(main, ["stability", "--trainer", "nowhere:train", "--quiet"])
    assert bad.exit_code == 1 and "cannot find" in bad.stderr
