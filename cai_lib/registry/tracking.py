"""MLflow tracking: every training run records the exact data, gates and code it came from.

Local default: a SQLite tracking store `mlflow/mlflow.db` and artifacts under
`mlflow/artifacts` (set `tracking_uri` in params.yaml [common], or MLFLOW_TRACKING_URI, for a
server or Databricks). A training run logs its params, per-step metrics, the Delta tables it
read with their versions (as MLflow dataset inputs and `input.<table>.version` tags), the
gate verdicts it relied on, the constitution sha and the git commit, and registers the model
(`cai-sl`, `cai-pm`, `cai-rl`). Weights travel as a safetensors folder inside a pyfunc model
defined from code (`cai_lib/registry/pyfunc_model.py`), so nothing is pickled; loading refuses pickles.
Promotion is an alias (`champion`, `challenger`).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

from cai_lib.ids import sha256_text
from cai_lib.lake.tables import Lake, is_uri

# The user's MLflow URIs, read before MLflow runs: `mlflow.set_tracking_uri` exports the
# variable itself, so reading it later would make one configure() call stick for good.
USER_ENV = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if os.environ.get(k)}


class GateNotPassed(ValueError):
    """Training was asked to read data no passing gate verdict covers."""


def configure(tracking_uri: str, artifact_dir: str, experiment: str) -> str:
    """Point MLflow at the store (env MLFLOW_TRACKING_URI wins) and return the experiment id."""
    import mlflow
    uri = USER_ENV.get("MLFLOW_TRACKING_URI") or tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()  # relative to the working folder
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(USER_ENV.get("MLFLOW_REGISTRY_URI") or uri)  # e.g. databricks-uc
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = artifact_dir if is_uri(artifact_dir) else Path(artifact_dir).resolve().as_uri()   # dbfs:/..., s3://
        exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    # runs *and* logged models go to this experiment (and so under artifact_dir), never to
    # MLflow's Default experiment, whose artifacts land in ./mlruns of whatever folder we run in
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's sha of the code's checkout, `-dirty` when tracked files differ; `unknown` outside git."""
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()  # dvc repro
        # rewrites dvc.lock while it runs: that is the pipeline's record, not a change to the code
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def passing_verdict(lake: Lake, stage: str, tables: list[str]) -> dict:
    """The latest `gate_events` verdict of `stage`, if it passed on the current versions of `tables`."""
    rows = [r for r in lake.read("gate_events").to_pylist() if r["stage"] == stage] if lake.exists("gate_events") else []
    if not rows:
        raise GateNotPassed(f"no `{stage}` gate verdict in {lake.root}: run `cai gate {stage} --lake {lake.root}` "
                            "before training (or pass --no-require-gates for an experiment)")
    last = max(rows, key=lambda r: r["created_at"])
    if not last["passed"]:
        if last.get("verdict") == "incomplete":
            raise GateNotPassed(f"the last `{stage}` gate is INCOMPLETE ({', '.join(last['incomplete_checks'])} could "
                                f"not run): run what they need, or waive them by name in params.yaml [gate] waive, "
                                f"and rerun `cai gate {stage}`")
        raise GateNotPassed(f"the last `{stage}` gate failed ({', '.join(last['failed_checks'])}): fix the data or "
                            f"the thresholds and rerun `cai gate {stage}`")
    seen = json.loads(last["input_versions"])
    stale = [t for t in tables if seen.get(t) != lake.version(t)]
    if stale:
        raise GateNotPassed(f"the last passing `{stage}` gate checked {', '.join(f'{t} v{seen.get(t)}' for t in stale)}"
                            f" but the lake now holds {', '.join(f'{t} v{lake.version(t)}' for t in stale)}: "
                            f"rerun `cai gate {stage}`")
    return last


LABELLER_KEYS = ("human_accuracy", "human_accuracy_ci", "human_n", "human_ece", "human_ece_ci", "swap_consistency",
                 "swap_consistency_ci", "model_fingerprint")


def labeller_figures(verdict: dict, metrics_path: str | os.PathLike | None) -> dict:
    """The labeller's agreement with human labels behind a labels verdict, for the training run's tags.

    A gate_events row keeps only the sha of the eval-labeler metrics it judged, so the figures
    are read back from the file, and only when it is still that file: a rerun of eval-labeler
    after the gate must not lend its figures to data the gate judged with others.
    """
    sha = json.loads(verdict.get("input_versions") or "{}").get("eval_metrics_sha")
    if sha is None:
        return {"evaluated": False}
    path = Path(metrics_path) if metrics_path else None
    text = path.read_text() if path is not None and path.is_file() else None
    if text is None or sha256_text(text)[:16] != sha:
        return {"evaluated": True, "eval_metrics_sha": sha,
                "missing": f"{metrics_path} is not the evaluation the gate judged (sha {sha}): rerun cai eval-labeler "
                           "and cai gate labels before training to carry the figures"}
    m = json.loads(text)
    return {"evaluated": True, "eval_metrics_sha": sha, "source": str(path),
            **{k: m[k] for k in LABELLER_KEYS if k in m}}


def log_lake_inputs(lake: Lake, tables: list[str]) -> dict[str, int | None]:
    """Log each table as a dataset input (Delta path + version) and as tags; return the versions."""
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    import mlflow
    versions = {}
    for t in tables:
        v = lake.version(t)
        versions[t] = v
        src = DeltaDatasetSource(path=str(Path(lake.root, t).resolve()), delta_table_version=v)
        mlflow.log_input(MetaDataset(source=src, name=f"{t}@v{v}", digest=f"{t}-v{v}"), context="training")
        mlflow.set_tag(f"input.{t}.version", str(v))
    mlflow.set_tag("input.lake", str(Path(lake.root).resolve()))
    return versions


@contextlib.contextmanager
def training_run(job: str, cfg, lake: Lake, tables: list[str], verdicts: dict[str, dict], tags: dict | None = None):
    """An MLflow run carrying the lineage every model version must have; yields the run."""
    import mlflow
    exp_id = configure(cfg.tracking_uri, cfg.artifact_dir, cfg.experiment)
    with mlflow.start_run(run_name=job, experiment_id=exp_id) as run:
        params = {k: v for k, v in vars(cfg).items() if v is not None and not isinstance(v, (dict, list))}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        log_lake_inputs(lake, tables)
        mlflow.set_tags({"cai.job": job, "git_commit": git_commit(),
                         **{f"gate.{s}.verdict_id": v["event_id"] for s, v in verdicts.items()},
                         **{f"gate.{s}.passed": str(v["passed"]) for s, v in verdicts.items()},
                         **{f"gate.{s}.promotable": str(v.get("promotable")) for s, v in verdicts.items()},
                         **{f"gate.{s}.promotion_blockers": ",".join(v.get("promotion_blockers") or [])
                            for s, v in verdicts.items()},
                         **{f"gate.{s}.waived": ",".join(v.get("waived_checks") or []) for s, v in verdicts.items()},
                         **{f"gate.{s}.labeller": json.dumps(v["labeller"], sort_keys=True)
                            for s, v in verdicts.items() if "labeller" in v},
                         **(tags or {})})
        yield run


def log_step_metrics(step: int, metrics: dict) -> None:
    import mlflow
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
