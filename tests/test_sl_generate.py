"""sl-generate on real Spark and real Delta: the default model end to end, reruns, failures, bad input."""
from __future__ import annotations

import pyarrow.compute as pc
import pytest

from cai_lib.lake.tables import Lake
from jobs.cli import main as cai
from jobs.sl_generate import SLGenerateConfig, run
from tests.conftest import ROOT

TINY = dict(rounds=1, batch_size=4, batches_per_commit=1, answer_max_new_tokens=24,
            critique_max_new_tokens=16, revision_max_new_tokens=24, temperature=0.7,
            constitution=str(ROOT / "constitutions/default.yaml"), params="/nonexistent.yaml")


def cfg(lake, **kw) -> SLGenerateConfig:
    return SLGenerateConfig(lake=str(lake), **{**TINY, **kw})


@pytest.mark.slow
def test_real_model_end_to_end_then_rerun_calls_nothing(spark, small_lake):
    out = run(spark, cfg(small_lake))
    lake = Lake(small_lake)
    ev = lake.read("generation_events")
    # 3 red-team prompts x (initial + critique + revision) + 2 helpful answers
    assert (out["generations"], out["ok"], out["failed"]) == (11, 11, 0)
    assert out["model_calls"] == 4  # batched: wave 0 = 5 answers in 2 batches of <= 4, then 1 + 1
    kinds = pc.value_counts(ev["kind"]).to_pylist()
    assert {k["values"]: k["counts"] for k in kinds} == {
        "initial_response": 3, "critique": 3, "revision": 3, "helpful_response": 2}
    assert len(set(ev["event_id"].to_pylist())) == ev.num_rows == 11
    for col in ("constitution_sha", "model_fingerprint", "template_sha", "sampling", "job_run_id"):
        assert ev[col].null_count == 0
    crit = ev.filter(pc.equal(ev["kind"], "critique"))
    assert crit["principle_id"].null_count == 0 and crit["parent_id"].null_count == 0
    assert all(t for t in ev["text"].to_pylist()) and min(ev["completion_tokens"].to_pylist()) > 0
    ds = lake.read("sl_dataset")
    assert ds.num_rows == 5
    revs = ds.filter(pc.equal(ds["source_kind"], "revision")).to_pylist()
    assert all(len(r["chain_event_ids"]) == 3 and r["final_event_id"] == r["chain_event_ids"][-1] for r in revs)
    texts = dict(zip(ev["event_id"].to_pylist(), ev["text"].to_pylist()))
    assert all(texts[r["final_event_id"]] == r["response"] for r in revs)

    before = lake.snapshot()
    again = run(spark, cfg(small_lake))
    assert (again["model_calls"], again["generations"], again["inserted"]) == (0, 0, 0)
    assert again["sl_dataset_rewritten"] is False
    assert lake.snapshot() == before  # no new Delta version of any table


def test_failed_generations_are_recorded_then_retried(spark, small_lake):
    """A request that fails becomes a failed event (not dropped); the next run retries it."""
    lake = Lake(small_lake)
    prompts = lake.read("prompts")
    victim = prompts.filter(pc.equal(prompts["kind"], "red_team"))["text"][0].as_py()
    failing = cfg(small_lake, backend="fake", base_model="fail-on:" + victim[:30])
    out = run(spark, failing)
    assert (out["failed"], out["ok"]) == (1, 8)  # 4 answers + 2 intact chains x 2; the failed chain stopped
    ev = lake.read("generation_events")
    failed = ev.filter(pc.equal(ev["status"], "failed")).to_pylist()
    assert len(failed) == 1 and failed[0]["error"].startswith("fake failure")
    assert failed[0]["text"] is None and failed[0]["event_id"] != failed[0]["target_event_id"]
    retry = run(spark, failing)
    assert (retry["generations"], retry["failed"]) == (1, 1)  # tried again (attempt 2), failed again
    attempts = sorted(r["attempt"] for r in lake.read("generation_events").to_pylist() if r["status"] == "failed")
    assert attempts == [1, 2]
    third = run(spark, failing)
    assert third["generations"] == 0 and third["gave_up"] == 1  # max_attempts=2 reached: left failed, counted
    assert lake.read("sl_dataset").num_rows == 4  # the other 2 red-team chains + 2 helpful answers


def test_bad_constitution_and_unknown_model_write_nothing(spark, small_lake, tmp_path, capsys):
    lake = Lake(small_lake)
    before = lake.snapshot()
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nversion: '1'\ndescription: d\ncritique_revision:\n  - id: a\n    critique: ''\n    revision: r\n")
    args = ["sl-generate", "--lake", str(small_lake), "--params", "/dev/null"]
    assert cai(args + ["--constitution", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "critique" in err
    assert cai(args + ["--base-model", "no/such-model", "--rounds", "1"]) == 1
    assert "no/such-model" in capsys.readouterr().err
    assert lake.snapshot() == before
