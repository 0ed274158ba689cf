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
    """Ingested once per test session (two `cai ingest` runs on delta-spark), then copied."""
    from tests.lakes import cached

    def build(lake: Path) -> None:
        import json
        red = [json.loads(x) for x in DEMO_RED.read_text().splitlines()[:12:4]]
        helpful = [json.loads(x) for x in DEMO_HELPFUL.read_text().splitlines()[:2]]
        sources = lake.parent / f"{lake.name}-sources"
        sources.mkdir(exist_ok=True)
        ingest(lake, write_jsonl(sources / "red.jsonl", red), "red_team")
        ingest(lake, write_jsonl(sources / "helpful.jsonl", helpful), "helpful")
    return cached(tmp_path / "lake", "small_lake", build)


def make_tiny_pm(path: Path) -> Path:
    """A preference model with a 1-layer random backbone on the default tokenizer (seconds, not minutes),
    saved at `path`: for jobs that need a PM's scores but not good ones (evaluate)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from cai_lib.backends.models import resolve_model
    from cai_lib.training.pm_model import PreferenceModel
    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    backbone = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    return PreferenceModel(backbone, tok, max_length=64).save(path)


def copy_lake(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
