"""MLflow tracking and the model registry: every trained model knows the exact data it came from.

Local default: a SQLite tracking store `mlflow/mlflow.db` and artifacts under
`mlflow/artifacts` (set `tracking_uri` in params.yaml [common], or MLFLOW_TRACKING_URI, for a
server or Databricks). A training run logs its params, per-step metrics, the Delta tables it
read with their versions (as MLflow dataset inputs and `input.<table>.version` tags), the
gate verdicts it relied on, the constitution sha and the git commit, and registers the model
(`cai-sl`, `cai-pm`, `cai-rl`). Weights travel as a safetensors folder inside a pyfunc model
defined from code (`cai_lib/mlflow_model.py`), so nothing is pickled; loading refuses pickles.
Promotion is an alias (`champion`, `challenger`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from cai_lib.lake import Lake
from cai_lib.weights import assert_no_pickles  # noqa: F401  (re-exported for callers)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# The user's MLflow URIs, read before MLflow runs: `mlflow.set_tracking_uri` exports the
# variable itself, so reading it later would make one configure() call stick for good.
_USER_ENV = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if os.environ.get(k)}


class GateNotPassed(ValueError):
    """Training was asked to read data no passing gate verdict covers."""


def configure(tracking_uri: str, artifact_dir: str, experiment: str) -> str:
    """Point MLflow at the store (env MLFLOW_TRACKING_URI wins) and return the experiment id."""
    import mlflow
    uri = _USER_ENV.get("MLFLOW_TRACKING_URI") or tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()  # relative to the working folder
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(_USER_ENV.get("MLFLOW_REGISTRY_URI") or uri)  # e.g. databricks-uc
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = Path(artifact_dir).resolve().as_uri() if "://" not in artifact_dir else artifact_dir
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
        raise GateNotPassed(f"the last `{stage}` gate failed ({', '.join(last['failed_checks'])}): fix the data or "
                            f"the thresholds and rerun `cai gate {stage}`")
    seen = json.loads(last["input_versions"])
    stale = [t for t in tables if seen.get(t) != lake.version(t)]
    if stale:
        raise GateNotPassed(f"the last passing `{stage}` gate checked {', '.join(f'{t} v{seen.get(t)}' for t in stale)}"
                            f" but the lake now holds {', '.join(f'{t} v{lake.version(t)}' for t in stale)}: "
                            f"rerun `cai gate {stage}`")
    return last


def log_lake_inputs(lake: Lake, tables: list[str]) -> dict[str, int | None]:
    """Log each table as a dataset input (Delta path + version) and as tags; return the versions."""
    import mlflow
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
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
                         **(tags or {})})
        yield run


def log_step_metrics(step: int, metrics: dict) -> None:
    import mlflow
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def register_folder(folder: str | os.PathLike, name: str, kind: str) -> str:
    """Log a safetensors model folder as a pyfunc model of the active run and register it; the version."""
    import mlflow
    assert_no_pickles(folder)
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))  # UC needs one
    info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts={"weights": str(folder)},
                                   registered_model_name=name, metadata={"cai_kind": kind}, pip_requirements=[],
                                   signature=signature)
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_model_version_tag(name, version, "cai_kind", kind)
    return version


_REF = re.compile(r"^(?:models:/)?(?P<name>[\w.-]+?)(?:(?:[:/])(?P<version>\d+)|@(?P<alias>[\w-]+))?$")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`cai-sl`, `cai-sl:3`, `cai-sl/3`, `models:/cai-sl/3`, `cai-sl@champion` -> (name, version, alias).

    >>> parse_ref("cai-rl@champion"), parse_ref("models:/cai-pm/2"), parse_ref("cai-sl")
    (('cai-rl', None, 'champion'), ('cai-pm', '2', None), ('cai-sl', None, None))
    """
    m = _REF.match(ref.strip())
    if not m:
        raise ValueError(f"not a model reference: {ref!r}; use NAME, NAME:VERSION or NAME@ALIAS (e.g. cai-rl@champion)")
    return m["name"], m["version"], m["alias"]


def model_version(ref: str):
    """The registry's ModelVersion for a reference (NAME alone = the latest version)."""
    import mlflow
    name, version, alias = parse_ref(ref)
    client = mlflow.MlflowClient()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version:
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"no registered model {ref!r}: {exc.message.splitlines()[0]}") from None
    if not versions:
        raise ValueError(f"no registered model named {name!r}; train one first (cai train-sl / train-pm / train-rl)")
    return max(versions, key=lambda v: int(v.version))


def download_model(ref: str, dst: str | os.PathLike | None = None) -> Path:
    """The safetensors folder of a registered version (by version or alias), checked for pickles."""
    import mlflow
    mv = model_version(ref)
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=dst))
    folder = _weights_folder(root, mv)
    assert_no_pickles(folder)
    return folder


def _weights_folder(root: Path, mv) -> Path:
    """The one weights folder inside a logged pyfunc model (`artifacts/<folder>`, see register_folder)."""
    folders = [p for p in (root / "artifacts").iterdir() if p.is_dir()] if (root / "artifacts").is_dir() else []
    if len(folders) != 1:
        raise ValueError(f"{mv.name} v{mv.version}: expected one weights folder under {root / 'artifacts'}")
    return folders[0]


def _local_artifacts(mv) -> Path | None:
    """The model's folder when its artifact store is this machine's file system, else None."""
    import mlflow
    from urllib.parse import unquote, urlparse
    uri = mlflow.MlflowClient().get_model_version_download_uri(mv.name, mv.version)
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    path = Path(unquote(parsed.path))
    return path if path.is_dir() else None


def set_alias(name: str, alias: str, version: str) -> None:
    import mlflow
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def lineage(ref: str, lake: Lake | None = None) -> dict:
    """From a model version to its run, input tables + versions, gate verdicts, parents and commit."""
    import mlflow
    mv = model_version(ref)
    client = mlflow.MlflowClient()
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    inputs = {}
    for d in run.inputs.dataset_inputs:
        src = json.loads(d.dataset.source)
        inputs[d.dataset.name.split("@")[0]] = {"version": src.get("delta_table_version"), "path": src.get("path")}
    gates = {}
    for key, value in tags.items():
        if key.startswith("gate.") and key.endswith(".verdict_id"):
            stage = key.split(".")[1]
            gates[stage] = {"verdict_id": value, "passed": tags.get(f"gate.{stage}.passed")}
            if lake is not None and lake.exists("gate_events"):
                rows = [r for r in lake.read("gate_events").to_pylist() if r["event_id"] == value]
                if rows:
                    gates[stage].update(checks=rows[0]["n_checks"], created_at=str(rows[0]["created_at"]),
                                        input_versions=json.loads(rows[0]["input_versions"]))
    registered = client.get_registered_model(mv.name).aliases or {}
    aliases = [a for a, v in registered.items() if str(v) == str(mv.version)]
    return {"model": mv.name, "version": str(mv.version), "aliases": sorted(aliases), "run_id": mv.run_id,
            "job": tags.get("cai.job"), "git_commit": tags.get("git_commit"),
            "constitution_sha": tags.get("constitution_sha"), "base_model": tags.get("base_model"),
            "parents": {k.removeprefix("parent."): v for k, v in tags.items() if k.startswith("parent.")},
            "inputs": inputs, "gates": gates,
            "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items())}}


def resolve_weights(ref: str, cfg=None) -> tuple[str, Path]:
    """(lineage label, local weights folder) for 'default', a folder, a cached hub id, or a registered
    model (`cai-sl`, `cai-sl:3`, `cai-rl@champion` -> ("cai-sl/3", its folder)).

    A version in a local artifact store (the default `mlflow/artifacts`) is read where it lies:
    no copy. One in a remote store is downloaded once into $CAI_MODEL_CACHE/registry/NAME/VERSION-RUN
    (a version's files never change), so jobs and Spark workers load a stable local folder.
    With `cfg` (a CommonConfig), MLflow is pointed at its store first, and only when the
    registry is needed: a local model never opens the store.
    """
    from cai_lib.backends.models import ModelNotFound, model_cache_dir, resolve_model
    try:
        return ref, Path(resolve_model(ref))
    except ModelNotFound as not_local:
        if cfg is not None:
            configure(cfg.tracking_uri, cfg.artifact_dir, cfg.experiment)
        try:
            mv = model_version(ref)
        except ValueError as exc:
            raise ValueError(f"{not_local}; nor is it a registered model: {exc}") from None
    in_store = _local_artifacts(mv)
    if in_store is not None:
        folder = _weights_folder(in_store, mv)
        assert_no_pickles(folder)
        return f"{mv.name}/{mv.version}", folder
    home = model_cache_dir() / "registry" / mv.name / f"{mv.version}-{mv.run_id[:12]}"  # run id: one per store
    if not home.is_dir():
        staging = home.with_name(f".{home.name}.download")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        download_model(f"{mv.name}:{mv.version}", staging).rename(home)  # complete or absent
        shutil.rmtree(staging, ignore_errors=True)
    assert_no_pickles(home)
    return f"{mv.name}/{mv.version}", home


def backend_model(cfg, ref: str) -> tuple[str, str]:
    """(lineage label, what the generation backend loads) for `ref`: a local id stays as it is,
    a registered model becomes its cached folder; the fake backend takes any id."""
    if cfg.backend == "fake":
        return ref, ref
    label, folder = resolve_weights(ref, cfg)
    return label, ref if label == ref else str(folder)


def model_folder(ref: str, cfg=None) -> Path:
    """The local weights folder of `ref` (see resolve_weights)."""
    return resolve_weights(ref, cfg)[1]


def run_tag(mv, key: str) -> str | None:
    """A tag of the run that produced a model version (e.g. its constitution_sha)."""
    import mlflow
    return mlflow.MlflowClient().get_run(mv.run_id).data.tags.get(key)
