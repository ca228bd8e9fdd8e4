import concurrent.futures
import json
import multiprocessing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from diffprobe import DataError, DriftReport, LinfBall, PointResult, RegionError, Verdict, certify, drift, get_difference
from diffprobe.deployment import deploy
from conftest import examples, mlp, shifted


def _sound(report, model_a, model_b, regions, difference="elementwise", n=500):
    """Every point's bound holds on samples of its region (the models as they run) and is at least
    its witness value."""
    pair = deploy(model_a, model_b, regions).pair
    diff = get_difference(difference)
    for p in report.points:
        region = regions[p.index]
        x = region.sample(n, torch.Generator().manual_seed(p.index))
        with torch.no_grad():
            values = diff(*pair.outputs(x))
        slack = 1e-9 * (1 + abs(p.bound))
        assert values.max().item() <= p.bound + slack
        assert p.found <= p.bound + slack
        if p.witness is not None:
            w = torch.tensor(p.witness, dtype=torch.float64).reshape(1, *region.shape)
            assert bool(region.contains(w))
            with torch.no_grad():
                assert diff(*pair.outputs(w)).item() == pytest.approx(p.found, rel=1e-9, abs=1e-12)


@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 0.5), noise=st.sampled_from([1e-3, 0.1]),
       norm=st.sampled_from(["inf", "2"]), top1=st.booleans(), threshold=st.sampled_from([None, 0.05, 1.0]))
def test_drift_bounds_hold_on_every_point(seed, eps, noise, norm, top1, threshold):
    a = mlp([4, 8, 6, 3], seed)
    b = mlp([4, 8, 6, 3], seed)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(noise * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    points = torch.rand(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    report = drift(a, b, points, eps=eps, norm=norm, clip=(0.0, 1.0), threshold=threshold, top1=top1,
                   chunk_size=4, search_steps=10, search_restarts=2)
    from diffprobe.regions import ball
    regions = [ball(p, eps, norm, (0.0, 1.0)) for p in points]
    _sound(report, a, b, regions, "top1" if top1 else "elementwise")
    assert [p.index for p in report.points] == list(range(6))
    assert sum(report.counts.values()) == (6 if report.threshold is not None else 0)


def test_verdicts_counts_and_agreement_on_a_shifted_copy():
    a = mlp([5, 8, 3], 0)
    b = shifted(a, 0.2)  # every output moves by exactly 0.2 everywhere
    points = torch.rand(10, 5, dtype=torch.float64)
    labels = torch.tensor([int(a(p.float().unsqueeze(0)).argmax()) for p in points])
    ok = drift(a, b, points, eps=0.1, threshold=0.25, labels=labels, arithmetic="exact")
    assert ok.verdict == Verdict.VERIFIED and ok.counts == {"verified": 10, "falsified": 0, "unknown": 0}
    assert ok.bound == pytest.approx(0.2, abs=1e-6) and ok.accuracy_a == 1.0 and ok.agreement == 1.0
    deployed = drift(a, b, points, eps=0.1, threshold=0.25)  # fp32 rounding: a little above 0.2
    assert deployed.verdict == Verdict.VERIFIED and 0.2 <= deployed.bound < 0.2 + 1e-4
    bad = drift(a, b, points, eps=0.1, threshold=0.15)
    assert bad.verdict == Verdict.FALSIFIED and bad.counts["falsified"] == 10
    assert all(p.found == pytest.approx(0.2, abs=1e-6) for p in bad.points)
    assert DriftReport.from_json(bad.to_json()) == bad
    for report in (ok, bad):  # typed records, and the JSON they were always written as
        text = report.to_json()
        assert DriftReport.from_json(text).to_json() == text
        assert all(isinstance(p, PointResult) and isinstance(p.verdict, Verdict) for p in report.points)
        keys = ["bound", "found", "witness", "branches", "notes", "verdict", "seconds"] + \
            (["gradient_masked"] if report is bad else []) + ["index", "label_a", "label_b"] + \
            (["label"] if report is ok else [])
        assert list(json.loads(text)["points"][0]) == keys


def test_drift_agrees_with_certify_point_by_point():
    a, b = mlp([4, 10, 3], 1), mlp([4, 10, 3], 2)
    points = torch.rand(3, 4, dtype=torch.float64)
    report = drift(a, b, points, eps=0.05, threshold=0.0, method="crown")
    for p in report.points:
        cert = certify(a, b, LinfBall(points[p.index], 0.05), method="crown", threshold=0.0)
        assert p.bound == pytest.approx(cert.bound, rel=1e-9)


def test_top1_mode_counts_flips():
    a = mlp([3, 8, 4], 0)
    b = mlp([3, 8, 4], 5)  # an unrelated model: labels differ on many points
    points = torch.rand(12, 3, dtype=torch.float64)
    report = drift(a, b, points, eps=0.01, top1=True)
    disagree = sum(p.label_a != p.label_b for p in report.points)
    assert report.difference == "top1" and report.threshold == 0.0
    assert report.counts["falsified"] >= disagree > 0
    assert report.agreement == pytest.approx(1 - disagree / 12)


def test_branch_and_bound_per_point_only_tightens():
    a, b = mlp([2, 16, 16, 1], 3), mlp([2, 16, 16, 1], 4)
    points = torch.zeros(2, 2, dtype=torch.float64)
    plain = drift(a, b, points, eps=1.0, threshold=0.0, method="crown")
    split = drift(a, b, points, eps=1.0, threshold=1e9 * 0 + plain.found * 1.5, method="crown",
                  time_budget_per_point=1.0)
    assert all(s.bound <= p.bound + 1e-12 for s, p in zip(split.points, plain.points))
    assert split.points[0].branches > 1 or split.points[0].verdict != Verdict.UNKNOWN


def test_checkpoint_and_resume(tmp_path):
    a, b = mlp([4, 6, 2], 0), mlp([4, 6, 2], 1)
    points = torch.rand(7, 4, dtype=torch.float64)
    path = tmp_path / "run.jsonl"
    full = drift(a, b, points, eps=0.05, threshold=0.5, checkpoint=path, chunk_size=3)
    lines = path.read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["points"] == 7
    # a crash after the first chunk, with the last line cut short
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    resumed = drift(a, b, points, eps=0.05, threshold=0.5, checkpoint=path, resume=True, chunk_size=3)
    assert [p.bound for p in resumed.points] == [p.bound for p in full.points]
    with pytest.raises(DataError, match="other settings"):
        drift(a, b, points, eps=0.06, threshold=0.5, checkpoint=path, resume=True)


def test_process_pool_gives_the_same_report():
    a, b = mlp([4, 6, 2], 0), mlp([4, 6, 2], 1)
    points = torch.rand(6, 4, dtype=torch.float64)
    serial = drift(a, b, points, eps=0.05, threshold=0.3, chunk_size=2)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel = drift(a, b, points, eps=0.05, threshold=0.3, chunk_size=2, executor=pool, threads_per_job=1)
    assert [(p.bound, p.verdict) for p in parallel.points] == [(p.bound, p.verdict) for p in serial.points]


@pytest.mark.slow
def test_dask_local_cluster_executor():
    distributed = pytest.importorskip("dask.distributed")
    a, b = mlp([4, 6, 2], 0), mlp([4, 6, 2], 1)
    points = torch.rand(4, 4, dtype=torch.float64)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        report = drift(a, b, points, eps=0.05, threshold=0.3, chunk_size=2, executor=client.get_executor())
    assert report.bound == pytest.approx(drift(a, b, points, eps=0.05, threshold=0.3).bound, rel=1e-12)


def test_bad_data_is_named(tmp_path):
    a, b = mlp([4, 6, 2], 0), mlp([4, 6, 2], 1)
    with pytest.raises(DataError, match="no points"):
        drift(a, b, torch.zeros(0, 4), eps=0.1, threshold=1.0)
    with pytest.raises(DataError, match="NaN"):
        drift(a, b, torch.full((2, 4), float("nan")), eps=0.1, threshold=1.0)
    with pytest.raises(DataError, match="input"):
        drift(a, b, torch.zeros(2, 5), eps=0.1, threshold=1.0)
    with pytest.raises(RegionError, match="eps"):
        drift(a, b, torch.zeros(2, 4), threshold=1.0)
    with pytest.raises(RegionError):
        drift(a, b, torch.zeros(2, 4), eps=-0.1, threshold=1.0)
    with pytest.raises(DataError, match="labels"):
        drift(a, b, torch.zeros(2, 4), eps=0.1, threshold=1.0, labels=[1, 2, 3])


def test_data_files_with_labels_and_vnnlib_folders(tmp_path):
    a, b = mlp([3, 6, 2], 0), mlp([3, 6, 2], 1)
    x = np.random.default_rng(0).random((5, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 1]))
    report = drift(a, b, tmp_path / "d.npz", eps=0.05, threshold=10.0)
    assert report.accuracy_a is not None and report.counts["verified"] == 5
    folder = tmp_path / "props"
    folder.mkdir()
    for i in range(2):
        lines = [f"(declare-const X_{j} Real)" for j in range(3)]
        lines += [f"(assert (>= X_{j} {0.1 * i}))\n(assert (<= X_{j} {0.1 * i + 0.05}))" for j in range(3)]
        (folder / f"p{i}.vnnlib").write_text("\n".join(lines))
    boxes = drift(a, b, folder, threshold=10.0)
    assert [p.source for p in boxes.points] == ["p0.vnnlib", "p1.vnnlib"] and boxes.eps is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty folder"):
        drift(a, b, empty, eps=0.1, threshold=1.0)


def test_ctrl_c_keeps_finished_points_and_resume_completes(tmp_path, monkeypatch):
    import importlib
    drift_module = importlib.import_module("diffprobe._drift")
    a, b = mlp([4, 6, 2], 0), mlp([4, 6, 2], 1)
    points = torch.rand(6, 4, dtype=torch.float64)
    real, calls = drift_module.run_chunk, []

    def interrupted_second_chunk(job, *finished):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job, *finished)

    monkeypatch.setattr(drift_module, "run_chunk", interrupted_second_chunk)
    path = tmp_path / "run.jsonl"
    partial = drift(a, b, points, eps=0.05, threshold=0.5, chunk_size=2, checkpoint=path)
    assert len(partial.points) == 2 and partial.total == 6 and "interrupted" in partial.notes[0]
    monkeypatch.setattr(drift_module, "run_chunk", real)
    done = drift(a, b, points, eps=0.05, threshold=0.5, chunk_size=2, checkpoint=path, resume=True)
    fresh = drift(a, b, points, eps=0.05, threshold=0.5, chunk_size=2)
    assert [p.bound for p in done.points] == [p.bound for p in fresh.points]


def test_html_repr_shows_the_riskiest_points_with_thumbnails():
    a = mlp([16, 8, 3], 0)
    b = shifted(a, 0.3)
    report = drift(a, b, torch.rand(3, 16, dtype=torch.float64), eps=0.1, threshold=0.1)
    page = report._repr_html_()
    assert "riskiest points" in page and page.count("<img") == 3 and "falsified" in page
    assert repr(report).startswith("DriftReport(elementwise over 3/3 points")


def test_search_and_certificate_html_show_the_witness_or_the_outputs():
    image_like = mlp([16, 8, 3], 0)
    region = LinfBall(torch.full((16,), 0.5, dtype=torch.float64), 0.1)
    other = shifted(image_like, 0.1)
    for result in (dp_search(image_like, other, region), certify(image_like, other, region)):
        page = result._repr_html_()
        assert page.count("<img") == 1 and repr(result).split("(")[0] in page
    flat = mlp([3, 5, 2], 0)
    small = LinfBall(torch.zeros(3, dtype=torch.float64), 0.1)
    assert dp_search(flat, shifted(flat, 0.1), small)._repr_html_().count("<img") == 1


def dp_search(a, b, region):
    from diffprobe import search
    return search(a, b, region, steps=5, restarts=2)


def test_l2_balls_are_bounded_in_one_batch_with_the_same_bounds():
    from diffprobe import L2Ball
    a, b = mlp([4, 10, 3], 1), mlp([4, 10, 3], 2)
    points = torch.rand(4, 4, dtype=torch.float64)
    report = drift(a, b, points, eps=0.1, norm="2", clip=(0.0, 1.0), threshold=0.0, method="crown")
    for p in report.points:
        cert = certify(a, b, L2Ball(points[p.index], 0.1, (0.0, 1.0)), method="crown", threshold=0.0)
        assert p.bound == pytest.approx(cert.bound, rel=1e-9)
