"""The README and docs/*.md run as written. Every command block either runs here, verbatim, in a
fresh shell (`bash -c` with only HOME and the system PATH: no activated virtualenv, no variable the
Makefile exports), after what the README says to do once per shell (its `source .venv/bin/activate`
block), in order, with a timeout, exit code 0 and the output named below; or its first line says
why not: `# not runnable here: WHY` (a cluster, a GPU, Databricks) or `# not run by the tests: WHY`
(minutes of model work). The blocks are read with pytest-codeblocks' extractor; the shell is ours,
since its runner inherits this process's environment and has no timeout.

They run in a copy of the repository's tracked files, with `.venv` (this interpreter's) and
`../shared` linked beside it, on a small lake (tests/synthetic_lake.py, plus a gate verdict and a
quarantine row) and a registry of a tiny policy registered as cai-sl v1 and cai-rl v1 (alias
challenger), which is what `make run` leaves. The README's first block, `make run` / `make test`,
is covered where it runs: the Makefile's `run` recipe is `dvc repro` (tests/test_dvc_pipeline.py
runs it on 3 prompts) and two commands run here, and .ci/run is `make test`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pytest_codeblocks import extract_from_file

from tests.conftest import ROOT

DOCS = ["README.md", "docs/clusters.md", "docs/architecture.md", "docs/data_plane.md"]
ACTIVATE = "source .venv/bin/activate\n"
NOT_RUN = ("# not runnable here: ", "-- not runnable here: ", "# not run by the tests: ")
# blocks each file keeps out of the run, with the reason in their first line: a new one must be added here
KEPT_OUT = {"README.md": 2, "docs/clusters.md": 8, "docs/architecture.md": 0, "docs/data_plane.md": 0}
FRESH_ENV = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
TIMEOUT_S = 300   # per block; a Spark start (ingest) is the slowest, ~20 s on a quiet 2-core machine
# what a block must print on the small lake and registry, by the start of its first line
OUTPUT = {
    "cai lineage cai-rl ": ["cai-rl v1", '"challenger"', "/mlflow/artifacts/"],
    "cai ingest --source ../shared": ["ingest: files=1, read=10,", "inserted=10,", "prompts_total=46",
                                      "prompts                      2        46  ok",
                                      "ok constitutions/default.yaml: id=cai-default",
                                      "wrote paper.yaml: 16 critique/revision pairs, 16 comparison principles"],
    'cai sql "SELECT kind, count(*)': ["│ pair_sample      │    48 │", "violence,6", "cooking,4", "failed_checks",
                                       "│ sl_dataset │ duplicate_id │     1 │"],
    "cai serve cai-rl ": ['{"predictions": ["'],
}


def blocks(doc: str) -> list:
    return [b for b in extract_from_file(ROOT / doc) if b.syntax]   # untagged blocks are diagrams and tables


def kept_out(block) -> str | None:
    """The reason a block gives in its first line for not being run here, if it gives one."""
    first = block.code.splitlines()[0]
    return next((first[len(p):].strip() for p in NOT_RUN if first.startswith(p)), None)


def runnable() -> list:
    return [pytest.param(doc, b, id=f"{doc}:{b.lineno}") for doc in DOCS for b in blocks(doc)
            if kept_out(b) is None and b.code != ACTIVATE and not b.code.startswith("make run")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the tracked files with the small lake and registry in their default places."""
    top = tmp_path_factory.mktemp("docs")
    repo = top / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    venv = Path(sys.prefix)
    assert (venv / "bin/activate").is_file(), f"the tests must run in a virtualenv ({venv}): the README activates one"
    (repo / ".venv").symlink_to(venv)
    (top / "shared").symlink_to(ROOT.parent / "shared")
    small_lake(repo / "lake")
    tiny_registry(repo, top / "tiny")
    return repo


def small_lake(root: Path) -> None:
    """tests/synthetic_lake.py's lake, a gate verdict and a quarantined row (for the README's queries)."""
    import pyarrow as pa

    from schemas import GATE_EVENTS, QUARANTINE
    from tests.synthetic_lake import build_clean_lake
    lake = build_clean_lake(root)
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    verdict = {f.name: None for f in GATE_EVENTS} | dict(
        event_id="g1", kind="gate_verdict", stage="sl", passed=True, verdict="passed", n_checks=1, n_failed=0,
        failed_checks=[], failures="[]", n_quarantined=1, suite_sha="s", input_versions="{}", job_run_id="j",
        created_at=now)
    lake.insert_new("gate_events", pa.Table.from_pylist([verdict], schema=GATE_EVENTS))
    row = {f.name: None for f in QUARANTINE} | dict(event_id="q1", stage="gate", source="sl_dataset",
                                                      reason="duplicate_id", job_run_id="j", created_at=now)
    lake.insert_new("quarantine", pa.Table.from_pylist([row], schema=QUARANTINE))


def tiny_registry(repo: Path, folder: Path) -> None:
    """cai-sl v1 and cai-rl v1 (alias challenger) in the README's default store: a one-layer policy with
    the default model's tokenizer and chat template, which serves in seconds."""
    import mlflow
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cai_lib.backends.models import resolve_model
    from cai_lib.registry.models import register_folder, set_alias
    from cai_lib.registry.tracking import configure
    src = Path(resolve_model("default"))
    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
            shutil.copy(f, folder / f.name)
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        configure(f"sqlite:///{repo}/mlflow/mlflow.db", str(repo / "mlflow/artifacts"), "cai")
        for name, kind in (("cai-sl", "sl"), ("cai-rl", "rl")):
            with mlflow.start_run():
                assert register_folder(folder, name, kind) == "1"
        set_alias("cai-rl", "challenger", "1")
    finally:   # mlflow.set_tracking_uri exports the variable: leave the other tests' environment as it was
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def fresh_shell(code: str, cwd: Path, log: Path) -> tuple[int, str]:
    """`code` after the README's activation, in a new session with a clean environment; whatever it
    left running (a server started with `&`) is stopped with its process group."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", ACTIVATE + "set -eo pipefail\n" + code], cwd=cwd, env=FRESH_ENV,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {TIMEOUT_S} s"
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
    return rc, log.read_text()


def test_every_block_runs_here_or_says_why():
    readme = (ROOT / "README.md").read_text()
    assert readme.index(f"```bash\n{ACTIVATE}```") < readme.index("\ncai "), "activation must come before any cai command"
    for doc in DOCS:
        found = blocks(doc)
        assert {b.syntax for b in found} <= {"bash", "sql"}, doc
        reasons = [kept_out(b) for b in found if kept_out(b) is not None]
        assert len(reasons) == KEPT_OUT[doc] and all(reasons), (doc, reasons)
        for b in extract_from_file(ROOT / doc):
            if not b.syntax:   # a diagram or a table: no line of it is a command a reader would copy
                assert not any(line.split(" ")[0] in ("cai", "make", "dvc", "curl", "python", "spark-submit",
                                                      "mlflow", "databricks") for line in b.code.splitlines()), b.lineno


@pytest.mark.slow
@pytest.mark.parametrize("doc,block", runnable())
def test_block_runs_in_a_fresh_shell(doc, block, workdir, tmp_path):
    rc, out = fresh_shell(block.code, workdir, tmp_path / "block.log")
    assert rc == 0, f"{doc}:{block.lineno} exited {rc} in a fresh shell:\n{block.code}\n---\n{out[-4000:]}"
    first = block.code.splitlines()[0]
    for expected in next((v for k, v in OUTPUT.items() if first.startswith(k)), []):
        assert expected in out, f"{doc}:{block.lineno} did not print {expected!r}:\n{out[-4000:]}"
    if first.startswith("cai serve"):
        assert len(json.loads(out[out.index('{"predictions"'):].splitlines()[0])["predictions"]) == 1


@pytest.mark.slow
def test_make_run_and_make_test_are_covered(workdir, tmp_path):
    first = blocks("README.md")[0].code.splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make run", "make test"]
    assert (ROOT / ".ci/run").read_text().splitlines()[-1] == "make test"
    # --no-print-directory: under `make test` (CI) a nested make would print "Entering directory" first
    made = ["-o", ".venv/.ready", "-o", "browser"]   # setup's parts, as if done
    recipe = subprocess.run(["make", "-n", "--no-print-directory", *made, "run"], cwd=workdir,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert recipe[0] == "dvc repro" and 'sh(["dvc", "repro"], repo)' in (ROOT / "tests/test_dvc_pipeline.py").read_text()
    rc, out = fresh_shell("\n".join(recipe[1:]), workdir, tmp_path / "make_run.log")
    assert rc == 0 and "generation_events" in out and "│ pair_sample      │     48 │          1440 │" in out, out[-4000:]
