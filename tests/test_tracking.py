import pytest
import torch

from diffprobe import LinfBall, certify, drift
from diffprobe.tracking import log_to_mlflow
from conftest import mlp, shifted

mlflow = pytest.importorskip("mlflow")


def test_certificate_and_drift_report_are_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the test store; users keep theirs
    a = mlp([3, 6, 2], 0)
    b = shifted(a, 0.2)
    cert = certify(a, b, LinfBall(torch.zeros(3), 0.1), threshold=0.1)
    report = drift(a, b, torch.rand(4, 3, dtype=torch.float64), eps=0.1, threshold=0.5)
    cert_run = log_to_mlflow(cert, run_name="cert")
    with mlflow.start_run() as outer:
        assert log_to_mlflow(report) == outer.info.run_id  # into the caller's active run
    client = mlflow.tracking.MlflowClient()
    logged = client.get_run(cert_run).data
    assert logged.metrics["bound"] == pytest.approx(cert.bound) and logged.tags["diffprobe.verdict"] == "falsified"
    assert logged.params["method"] == cert.method and logged.params["region_type"] == "linf"
    logged = client.get_run(outer.info.run_id).data
    assert logged.metrics["count_verified"] == 4 and logged.params["eps"] == "0.1"
    artifacts = [f.path for f in client.list_artifacts(outer.info.run_id, "diffprobe")]
    assert artifacts == ["diffprobe/DriftReport.json"]
    assert mlflow.get_tracking_uri() == (tmp_path / "mlruns").as_uri()
