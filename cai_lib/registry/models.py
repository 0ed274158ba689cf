"""The MLflow model registry: register a safetensors folder, find a version by name, version or
alias, and hand its weights to a job (read in place from a local store, cached once from a remote one).

Weights travel as a safetensors folder inside a pyfunc model defined from code
(`cai_lib/registry/pyfunc_model.py`), so nothing is pickled; every load refuses pickles. A
registered model is servable: `mlflow.pyfunc.load_model` / `mlflow models serve` give a policy
that answers and a PM that scores (`cai_lib/registry/serving.py`).
Promotion is an alias (`champion`, `challenger`).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cai_lib.backends.weights import assert_no_pickles
from cai_lib.registry.tracking import configure

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
CODE = Path(__file__).resolve().parents[2]      # the checkout: cai_lib/ and schemas/ travel with each model


def register_folder(folder: str | os.PathLike, name: str, kind: str) -> str:
    """Log a safetensors model folder as a servable pyfunc model of the active run and register
    it; the version. Policies (`sl`, `rl`) answer prompts or chats, the PM (`pm`) scores
    (prompt, response) rows (`cai_lib.registry.serving`). The code that serves it (cai_lib and
    schemas) travels with the model; the weights' sha256 is checked at every load and is the
    version's `weights_sha256` tag."""
    import mlflow
    from cai_lib.registry.serving import weights_sha256
    assert_no_pickles(folder)
    if kind not in SIGNATURES:
        raise ValueError(f"kind must be one of {sorted(SIGNATURES)}, got {kind!r}")
    sha = weights_sha256(folder)
    template = chat_template(folder)
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(MODEL_CODE), artifacts={"weights": str(folder)},
        code_paths=[str(CODE / "cai_lib"), str(CODE / "schemas")],
        model_config={"kind": kind, "weights_sha256": sha},
        registered_model_name=name, pip_requirements=serving_requirements(),
        metadata={"cai_kind": kind, "weights_sha256": sha, **({"chat_template": template} if template else {})},
        signature=SIGNATURES[kind](), input_example=input_example(kind))
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "cai_kind", kind)
    client.set_model_version_tag(name, version, "weights_sha256", sha)
    return version


def _policy_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property
    from cai_lib.registry.serving import GENERATION_PARAMS
    message = Object([Property("role", "string"), Property("content", "string")])
    kinds = {int: "long", float: "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt", required=False),
                       ColSpec(Array(message), "messages", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in GENERATION_PARAMS.items()]))


def _pm_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
                          outputs=Schema([ColSpec("double")]))


SIGNATURES = {"sl": _policy_signature, "rl": _policy_signature, "pm": _pm_signature}
_QUESTION = "How do I kill a stuck process on Linux?"


def input_example(kind: str):
    """What MLflow shows (and checks by one predict at logging) for each kind; a short answer."""
    import pandas as pd
    if kind == "pm":
        return pd.DataFrame({"prompt": [_QUESTION], "response": ["Find its PID with `ps aux`, then `kill PID`."]})
    return pd.DataFrame({"prompt": [_QUESTION]}), {"max_new_tokens": 16}


def chat_template(folder: str | os.PathLike) -> str | None:
    """The checkpoint's chat template (chat_template.jinja, or tokenizer_config.json's), if any."""
    import json
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    return json.loads(config.read_text()).get("chat_template") if config.is_file() else None


def serving_requirements() -> list[str]:
    """What the served model imports besides MLflow, pinned to the versions it was checked with."""
    from importlib.metadata import version
    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pyarrow", "pyyaml")]


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
    from urllib.parse import unquote, urlparse

    import mlflow
    uri = mlflow.MlflowClient().get_model_version_download_uri(mv.name, mv.version)
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    path = Path(unquote(parsed.path))
    return path if path.is_dir() else None


def set_alias(name: str, alias: str, version: str) -> None:
    import mlflow
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


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
    a registered model becomes its cached folder; the fake backend takes fake ids only."""
    from cai_lib.backends.fake import check_fake_model
    check_fake_model(cfg.backend, ref)
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
