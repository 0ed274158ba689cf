"""`cai serve MODEL`: MLflow's scoring server for a registered model, from any shell.

    cai serve cai-rl --port 5001              # the latest cai-rl version on 127.0.0.1:5001
    cai serve cai-rl@champion                 # the version `cai promote` made champion
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"prompt": "Hi"}], "params": {"max_new_tokens": 32}}'

Why not `mlflow models serve` itself: it starts the server as `bash -c 'exec uvicorn ...'`, found on
PATH, so in a shell that did not activate the virtualenv it exits 127. This command runs MLflow with
the interpreter that runs `cai` and puts that interpreter's folder (the virtualenv's bin, where
uvicorn is) first on PATH, and points it at the store of the params file ([common] tracking_uri),
as every other command does. The reference is looked up first, so a missing model is one line before
any server starts, and the line the server prints first names the version it serves.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cai_lib.config import RegistryConfig, default_params, read_params


def server_command(model_uri: str, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of MLflow's server: this interpreter, its folder first on PATH (uvicorn),
    the MLflow URIs this process was pointed at. `--env-manager local`: the model runs in this
    environment, which has its pinned requirements, instead of a new one built from PyPI."""
    import mlflow
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri()}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]
    return argv, env


def resolve(model: str, params: str, tracking_uri: str | None) -> str:
    """`models:/NAME/VERSION` of a reference, in the store the params file names (MLFLOW_TRACKING_URI
    and --tracking-uri win, as for `cai lineage`); a ValueError naming the model when it is not there."""
    from cai_lib.registry.models import model_version
    from cai_lib.registry.tracking import USER_ENV, configure
    common = read_params(params).get("common") or {}
    configure(tracking_uri or USER_ENV.get("MLFLOW_TRACKING_URI") or common.get("tracking_uri", RegistryConfig.tracking_uri),
              common.get("artifact_dir", RegistryConfig.artifact_dir), common.get("experiment", RegistryConfig.experiment))
    mv = model_version(model)
    return f"models:/{mv.name}/{mv.version}"


def serve_main(argv) -> int:
    p = argparse.ArgumentParser(prog="cai serve", description="MLflow's scoring server (/invocations, /ping) for a "
                                "registered model, with this environment's uvicorn, from any shell.")
    p.add_argument("model", help="cai-rl@champion, cai-sl:3, models:/cai-pm/2, or a name (= its latest version)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=5001, help="port (default 5001: `mlflow ui` takes 5000)")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model")
    p.add_argument("--params", default=default_params(), help="params file whose [common] names the MLflow store")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the params file's tracking_uri; "
                   "env MLFLOW_TRACKING_URI wins over the file)")
    a = p.parse_args(argv)
    uri = resolve(a.model, a.params, a.tracking_uri)
    cmd, env = server_command(uri, a.host, a.port, a.workers)
    print(f"cai serve: {uri.removeprefix('models:/')} on http://{a.host}:{a.port}/invocations "
          f"(store {env['MLFLOW_TRACKING_URI']})", flush=True)
    os.execve(cmd[0], cmd, env)   # the server replaces this process: a signal to it reaches MLflow directly
