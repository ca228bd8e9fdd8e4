"""Optional MLflow logging of a result: parameters, metrics, a verdict tag and the JSON itself.

Logs to the caller's active run, or to a new run under the caller's tracking settings; the
tracking URI and experiment are never changed here.
"""
import contextlib

from .errors import DiffprobeError

_PARAMS = {"seed", "threshold", "eps", "norm", "difference", "method", "total"}


def log_to_mlflow(result, *, run_name=None):
    """Log `result` (SearchResult, Certificate or DriftReport) to MLflow; returns the run id."""
    try:
        import mlflow
    except ImportError as exc:
        raise DiffprobeError("MLflow logging needs mlflow: pip install 'diffprobe[mlflow]'") from exc
    params, metrics = _params_and_metrics(result.to_dict())
    active = mlflow.active_run()
    with contextlib.nullcontext(active) if active else mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        verdict = getattr(result, "verdict", None)
        mlflow.set_tag("diffprobe.result", type(result).__name__)
        if verdict is not None:
            mlflow.set_tag("diffprobe.verdict", verdict.value)
        mlflow.log_text(result.to_json(indent=1), f"diffprobe/{type(result).__name__}.json")
        return run.info.run_id


def _params_and_metrics(data):
    params, metrics = {}, {}
    for key, value in data.items():
        if key in _PARAMS or isinstance(value, str):
            params[key] = "" if value is None else value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            metrics[key] = float(value)
        elif key == "counts":
            metrics.update({f"count_{name}": float(n) for name, n in value.items()})
        elif key == "region":
            params.update({f"region_{k}": value[k] for k in ("type", "eps", "clip") if k in value})
    return params, metrics
