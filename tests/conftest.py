"""Shared fixtures: one Spark session and one loaded model per test session; tmp_path lakes."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEMO_RED = ROOT / "data/demo/red_team_prompts.jsonl"
DEMO_HELPFUL = ROOT / "data/demo/helpful_prompts.jsonl"

os.environ.setdefault("CAI_MODEL_CACHE", str(ROOT / ".cache/models"))


def _delta_rs_params() -> str:
    """The project's params.yaml with `lake_engine: delta-rs`, for the commands a test runs without
    --params ($CAI_PARAMS): each of those tests a job's logic, which both engines share, on the engine
    that starts no Spark session for ingest and the gates and commits in milliseconds. The Spark plane
    is tested by the tests that ask for it (`--lake-engine spark`, test_one_engine, the plane equality
    tests) and by test_dvc_pipeline, which runs params.yaml itself (spark)."""
    import tempfile

    import yaml
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["common"]["lake_engine"] = "delta-rs"
    path = Path(tempfile.mkdtemp(prefix="cai-tests-")) / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


os.environ["CAI_PARAMS"] = _delta_rs_params()
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
from cai_lib.env import set_offline_env  # noqa: E402

set_offline_env()


@pytest.fixture(scope="session")
def spark():
    from cai_lib.runtime.session import get_spark
    session = get_spark("local[1]", "cai-tests", delta=True)   # delta-spark: Maven via Ivy
    yield session
    session.stop()


@pytest.fixture(scope="session")
def hf_backend():
    """The real default model (SmolLM2-135M-Instruct, bf16, CPU), loaded once."""
    from cai_lib.backends import load_backend
    return load_backend("transformers", "default", threads=2, batch_size=8)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ingest(lake: Path, source: Path, kind: str, **kw) -> dict:
    from jobs.ingest import IngestConfig, run
    return run(None, IngestConfig(lake=str(lake), source=str(source), kind=kind, test_fraction=0.0, **kw))


@pytest.fixture
def small_lake(tmp_path) -> Path:
    """A lake with 3 red-team and 2 helpful demo prompts (all split=train)."""
    return make_small_lake(tmp_path)


def make_small_lake(tmp_path: Path) -> Path:
    import json
    red = [json.loads(x) for x in DEMO_RED.read_text().splitlines()[:12:4]]
    helpful = [json.loads(x) for x in DEMO_HELPFUL.read_text().splitlines()[:2]]
    lake = tmp_path / "lake"
    ingest(lake, write_jsonl(tmp_path / "red.jsonl", red), "red_team")
    ingest(lake, write_jsonl(tmp_path / "helpful.jsonl", helpful), "helpful")
    return lake


def copy_lake(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
