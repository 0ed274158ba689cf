"""`cai serve`: MLflow's server runs with the interpreter that runs `cai`, that interpreter's folder
(the virtualenv's bin, where uvicorn is) first on PATH, so it starts from a shell that never activated
the virtualenv; a model that is not registered is one line before any server starts. The README's
serve block answering `curl` in a fresh shell is tests/test_docs.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs.cli import main as cai


def test_the_server_runs_with_this_environments_uvicorn(monkeypatch):
    import mlflow

    from jobs.serve import server_command
    monkeypatch.setenv("PATH", "/usr/bin:/bin")   # a shell that did not activate .venv
    argv, env = server_command("models:/cai-rl/1", "127.0.0.1", 5001, 1)
    assert argv == [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cai-rl/1", "--env-manager",
                    "local", "-h", "127.0.0.1", "-p", "5001", "-w", "1"]
    assert env["PATH"] == f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"
    assert (Path(sys.executable).parent / "uvicorn").is_file()   # what `bash -c 'exec uvicorn ...'` must find
    assert env["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri()


def test_a_model_not_registered_is_one_line_before_any_server(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # configure() exports it: restored after the test
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert cai(["serve", "cai-rl@champion", "--tracking-uri", store, "--params", "/dev/null"]) == 1
    err = capsys.readouterr().err.splitlines()   # MLflow's own INFO lines come first: it created the empty store
    assert err[-1] == "cai serve: error: no registered model 'cai-rl@champion': Registered Model with name=cai-rl not found"
