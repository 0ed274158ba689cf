"""No silent failure: a job whose model work fails exits 1 with the count and the first error,
given-up work says how to retry it, a derived table never shrinks unexplained, and the CLI keeps
the traceback of a bug. All on the fake backend ("fail-on:TEXT" fails requests holding TEXT)."""
from __future__ import annotations

import json

import pytest

from cai_lib.lake.tables import Lake
from jobs.cli import COMMANDS
from jobs.cli import main as cai
from jobs.common import Failures, report
from tests.conftest import ROOT, make_tiny_pm

DEFAULT = str(ROOT / "constitutions/default.yaml")
MEDICAL = str(ROOT / "constitutions/medical_information.yaml")
ALL = "fail-on:role"   # every chat's JSON holds "role": every request fails
FIRST = "fake failure on 'role'"


def sl(lake, *extra) -> list[str]:
    return ["sl-generate", "--lake", str(lake), "--params", "/dev/null", "--backend", "fake", "--rounds", "1",
            "--batch-size", "4", "--batches-per-commit", "1", "--constitution", DEFAULT, *extra]


def lines(capsys) -> tuple[list[str], list[str]]:
    got = capsys.readouterr()
    return ([x for x in got.out.splitlines() if not x.startswith(("wave", "  ["))],
            [x for x in got.err.splitlines() if x.startswith(("cai ", "  "))])   # not transformers' loading bars


def test_sl_generate_that_fails_everything_exits_1_then_says_how_to_retry(spark, small_lake, capsys):
    failing = "cai sl-generate: error: 5 of 5 generations failed (first error: fake failure on 'role'); a rerun " \
              "retries those with attempts left (max_attempts=2) (more than max_failed_fraction=0.1 of this " \
              "run's generations; what succeeded is committed)"
    for attempt in (1, 2):
        assert cai(sl(small_lake, "--base-model", ALL)) == 1, attempt
        out, err = lines(capsys)
        assert out == ["sl-generate: prompts=5, generations=5, model_calls=2, ok=0, failed=5, gave_up=0, inserted=5, "
                       "completion_tokens=0, sl_dataset_rows=0, sl_dataset_rewritten=%s, planned_prompts=5"
                       % (attempt == 1)]
        assert err == [failing]
    assert cai(sl(small_lake, "--base-model", ALL)) == 1   # everything gave up: nothing ran, and that is no success
    out, err = lines(capsys)
    assert out == ["sl-generate: prompts=5, generations=0, model_calls=0, ok=0, failed=0, gave_up=5, inserted=0, "
                   "completion_tokens=0, sl_dataset_rows=0, sl_dataset_rewritten=False, planned_prompts=5"]
    assert err == ["cai sl-generate: error: 5 generations gave up after 2 failed attempts and were skipped: pass "
                   "--max-attempts 3 to retry them; this run did no generations (more than max_failed_fraction=0.1 "
                   "of this run's generations; what succeeded is committed)"]
    assert cai(sl(small_lake, "--base-model", "fake", "--max-attempts", "3")) == 0   # the retry the message names
    out, err = lines(capsys)
    assert out[-1].startswith("sl-generate: prompts=5, generations=11, model_calls=4, ok=11, failed=0, gave_up=0,")
    assert err == [] and Lake(small_lake).count("sl_dataset") == 5
    assert Lake(small_lake).count("generation_events") == 10 + 11   # 2 failed attempts x 5 + 11 results


def test_label_whose_scorings_all_fail_exits_1_and_keeps_the_preference_dataset(spark, small_lake, capsys):
    base = ["--lake", str(small_lake), "--params", "/dev/null", "--backend", "fake", "--batch-size", "8"]
    assert cai(["sample-pairs", *base, "--policy", "fake"]) == 0
    assert cai(["label", *base, "--constitution", DEFAULT, "--feedback-model", "fake"]) == 0
    capsys.readouterr()
    # another constitution: new comparisons, and every scoring prompt holds "Option (B):"
    assert cai(["label", *base, "--constitution", MEDICAL, "--feedback-model", "fail-on:Option (B):"]) == 1
    out, err = lines(capsys)
    assert ", quarantined=6, " in out[-1] and ", failed=6, " in out[-1]
    assert err[0] == ("cai label: error: 6 of 6 scorings failed (first error: RuntimeError: fake scoring failure on "
                      "'Option (B):'); a rerun retries them (more than max_failed_fraction=0.1 of this run's scorings; "
                      "what succeeded is committed)")
    assert "refusing to rebuild preference_dataset: it would shrink from 3 to 0 rows" in err[1]
    assert Lake(small_lake).count("preference_dataset") == 3


def test_failures_within_the_bound_are_a_warning_and_exit_0(spark, small_lake, capsys):
    victim = [r["text"] for r in Lake(small_lake).read("prompts").to_pylist() if r["kind"] == "red_team"][0]
    args = sl(small_lake, "--base-model", "fail-on:" + victim[:30])
    assert cai(args + ["--max-failed-fraction", "0.12"]) == 0   # 1 of 9 = 0.111
    out, err = lines(capsys)
    assert ", ok=8, failed=1, gave_up=0," in out[-1]
    assert err == [f"cai sl-generate: warning: 1 of 9 generations failed (first error: fake failure on "
                   f"{victim[:30]!r}); a rerun retries those with attempts left (max_attempts=2)"]


def test_sl_dataset_is_not_rebuilt_smaller_without_a_reason(spark, small_lake, capsys):
    lake = Lake(small_lake)
    assert cai(sl(small_lake, "--base-model", "fake")) == 0 and lake.count("sl_dataset") == 5
    version = lake.version("sl_dataset")
    capsys.readouterr()
    # another constitution, every generation failing: the 5-row table must not become 0 rows
    assert cai(sl(small_lake, "--base-model", ALL, "--constitution", MEDICAL)) == 1
    out, err = lines(capsys)
    assert out[-1].endswith("ok=0, failed=5, gave_up=0, inserted=5, completion_tokens=0, sl_dataset_rows=5, "
                            "sl_dataset_rewritten=False, planned_prompts=5")
    assert err[0].startswith("cai sl-generate: error: 5 of 5 generations failed (first error: fake failure on 'role')")
    assert err[1] == ("  refusing to rebuild sl_dataset: it would shrink from 5 to 0 rows, and 5 of the dropped rows "
                      "are for inputs these settings still select: their chains are incomplete under these settings "
                      "(constitution, model, rounds): 5 of those prompts were in this run (5 generations failed, 0 "
                      "gave up), 0 were not (outside --limit). The old table is kept. Fix: rerun until that work "
                      "succeeds, or pass --allow-shrink to replace it anyway")
    assert (lake.count("sl_dataset"), lake.version("sl_dataset")) == (5, version)
    # no failure at all, but --limit 1 completes 2 of the 5 prompts under the new constitution: refused too
    assert cai(sl(small_lake, "--base-model", "fake", "--constitution", MEDICAL, "--limit", "1")) == 1
    out, err = lines(capsys)
    assert err == ["cai sl-generate: error: refusing to rebuild sl_dataset: it would shrink from 5 to 2 rows, and 3 "
                   "of the dropped rows are for inputs these settings still select: their chains are incomplete under "
                   "these settings (constitution, model, rounds): 0 of those prompts were in this run (0 generations "
                   "failed, 0 gave up), 3 were not (outside --limit). The old table is kept. Fix: rerun until that "
                   "work succeeds, or pass --allow-shrink to replace it anyway"]
    assert lake.version("sl_dataset") == version
    assert cai(sl(small_lake, "--base-model", "fake", "--constitution", MEDICAL, "--limit", "1", "--allow-shrink")) == 0
    assert lines(capsys)[1] == [
        "cai sl-generate: warning: sl_dataset shrank from 5 to 2 rows: 0 dropped rows are for inputs these settings "
        "no longer select, 3 dropped anyway (--allow-shrink): their chains are incomplete under these settings "
        "(constitution, model, rounds): 0 of those prompts were in this run (0 generations failed, 0 gave up), 3 "
        "were not (outside --limit)"]
    assert lake.count("sl_dataset") == 2
    # prompts no longer selected explain a shrink: it goes ahead, and says so
    assert cai(sl(small_lake, "--base-model", "fake", "--constitution", MEDICAL, "--splits", "test")) == 0
    assert lines(capsys)[1] == ["cai sl-generate: warning: sl_dataset shrank from 2 to 0 rows: 2 dropped rows are "
                                "for inputs these settings no longer select"]


def test_sample_pairs_and_label_fail_loudly_and_keep_the_preference_dataset(spark, small_lake, capsys):
    base = ["--lake", str(small_lake), "--params", "/dev/null", "--backend", "fake", "--batch-size", "8"]
    assert cai(["sample-pairs", *base, "--policy", ALL]) == 1
    out, err = lines(capsys)
    assert out[-1] == "sample-pairs: prompts=3, samples=6, model_calls=1, ok=0, failed=6, gave_up=0, inserted=6"
    assert err == ["cai sample-pairs: error: 6 of 6 responses failed (first error: fake failure on 'role'); a rerun "
                   "retries those with attempts left (max_attempts=2) (more than max_failed_fraction=0.1 of this "
                   "run's responses; what succeeded is committed)"]
    assert cai(["sample-pairs", *base, "--policy", "fake"]) == 0
    label = ["label", *base, "--constitution", DEFAULT]
    assert cai(label + ["--feedback-model", "fake"]) == 0
    lake = Lake(small_lake)
    assert lake.count("preference_dataset") == 3
    capsys.readouterr()
    cot = label + ["--cot", "--feedback-model", "fail-on:Option (A):"]
    assert cai(cot) == 1
    out, err = lines(capsys)
    assert ", failed=6, cot_failed=6, cot_gave_up=0, ai_pairs=0, human_pairs=0, " in out[-1]
    assert err == ["cai label: error: 6 of 6 chains of thought failed (first error: fake failure on 'Option (A):'); a "
                   "rerun retries those with attempts left (max_attempts=2) (more than max_failed_fraction=0.1 of "
                   "this run's chains of thought; what succeeded is committed)",
                   "  refusing to rebuild preference_dataset: it would shrink from 3 to 0 rows, and 3 of the dropped "
                   "rows are for inputs these settings still select: those pairs lack labels under these settings "
                   "(constitution, feedback model, ensemble, cot): 0 scorings failed and 6 chains of thought failed "
                   "or gave up in this run. The old table is kept. Fix: rerun until that work succeeds, or pass "
                   "--allow-shrink to replace it anyway"]
    assert lake.count("preference_dataset") == 3
    assert cai(cot) == 1
    capsys.readouterr()
    assert cai(cot) == 1   # all given up
    assert lines(capsys)[1][0] == (
        "cai label: error: 6 chains of thought gave up after 2 failed attempts and were skipped: pass --max-attempts 3 "
        "to retry them; this run did no chains of thought (more than max_failed_fraction=0.1 of this run's chains "
        "of thought; what succeeded is committed)")


@pytest.fixture
def tiny_pm(tmp_path):
    return make_tiny_pm(tmp_path / "pm")


def test_evaluate_counts_failed_and_given_up_answers(spark, small_lake, tiny_pm, tmp_path, capsys):
    args = ["evaluate", "--lake", str(small_lake), "--params", "/dev/null", "--backend", "fake",
            "--policies", f"bad={ALL}", "--feedback-model", "fake", "--reward-model", str(tiny_pm), "--splits", "train",
            "--metrics", str(tmp_path / "ev.json"), "--plot", str(tmp_path / "ev.png")]
    assert cai(args) == 1
    out, err = lines(capsys)
    assert out[-1] == ("evaluate: prompts=5, comparisons=0, model_calls=1, failed=5, gave_up=0, comparisons_failed=0, "
                       "bad_harmlessness=None, bad_over_refusal=None")
    assert err == ["cai evaluate: error: 5 of 5 answers of fail-on:role failed (first error: fake failure on 'role'); "
                   "a rerun retries those with attempts left (max_attempts=2) (more than max_failed_fraction=0.1 of "
                   "this run's answers of fail-on:role; what succeeded is committed)"]
    assert cai(args) == 1 and cai(args) == 1
    out, err = lines(capsys)
    assert out[-1] == ("evaluate: prompts=5, comparisons=0, model_calls=0, failed=0, gave_up=5, comparisons_failed=0, "
                       "bad_harmlessness=None, bad_over_refusal=None")
    assert "5 answers of fail-on:role gave up after 2 failed attempts and were skipped: pass --max-attempts 3" in err[-1]
    metrics = json.loads((tmp_path / "ev.json").read_text())
    assert (metrics["answers_gave_up"], metrics["comparisons_failed"]) == (5, 0)
    assert {k: metrics["models"]["bad"][k] for k in ("answers", "failed", "gave_up")} == \
        {"answers": 0, "failed": 0, "gave_up": 5}


def test_evaluate_writes_each_answer_once_and_a_rerun_calls_no_model(spark, small_lake, tiny_pm, tmp_path):
    volatile = {"job_run_id", "created_at", "latency_ms"}
    args = ["evaluate", "--lake", str(small_lake), "--params", "/dev/null", "--backend", "fake",
            "--policies", "base=fake", "other=fake:prefer=sorry", "--feedback-model", "fake:prefer=sorry",
            "--reward-model", str(tiny_pm), "--splits", "train", "--batch-size", "2", "--batches-per-commit", "1",
            "--metrics", str(tmp_path / "ev.json"), "--plot", str(tmp_path / "ev.png")]
    assert cai(args) == 0
    metrics = json.loads((tmp_path / "ev.json").read_text())
    events = sorted(({k: v for k, v in r.items() if k not in volatile}
                     for r in Lake(small_lake).read("generation_events").to_pylist()), key=lambda r: r["event_id"])
    # 5 prompts x 2 models, batches of 2: 3 model calls per model; 5 prompts x 1 model pair x 2 orders compared
    assert metrics["model_calls"] == 6 and metrics["comparisons"] == 5
    assert len(events) == 10 and {r["kind"] for r in events} == {"eval_response"}
    assert sorted(r["model_id"] for r in events) == ["fake"] * 5 + ["fake:prefer=sorry"] * 5
    assert cai(args) == 0   # a rerun: the same answers, no model call for them
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["model_calls"] == 0 and again["models"] == metrics["models"] and again["elo"] == metrics["elo"]
    assert len(Lake(small_lake).read("generation_events")) == 10


def test_a_failed_order_fails_its_comparison_and_is_counted():
    from jobs.evaluate import debiased_comparisons
    ok = {"logprob_a": -0.5, "logprob_b": -1.0, "error": None}
    bad = {"logprob_a": None, "logprob_b": None, "error": "RuntimeError: out of memory"}
    comps, fails = debiased_comparisons([("a", "b"), ("a", "c"), ("b", "c")], [ok, ok, ok, bad, bad, ok])
    assert [c[:2] for c in comps] == [("a", "b")]
    assert (fails.attempted, fails.failed, fails.first_error) == (3, 2, "RuntimeError: out of memory")


def test_report_always_shows_the_failure_count(capsys):
    report("x", {"rows": 2, "failures": [Failures("scorings", attempted=4, failed=1), Failures("cots", gave_up=2)]})
    assert capsys.readouterr().out == "x: rows=2, failed=1, gave_up=2\n"


def boom(argv):
    raise {"key": KeyError, "value": ValueError}[argv[0]]("broken " + argv[0])


def test_a_bug_keeps_its_traceback_and_expected_errors_stay_one_line(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "boom", ("tests.test_job_failures:boom", "raises"))
    with pytest.raises(KeyError, match="broken key"):   # a bug: the traceback is kept
        cai(["boom", "key"])
    assert cai(["boom", "value"]) == 1
    assert capsys.readouterr().err == "cai boom: error: broken value\n"
    with pytest.raises(ValueError, match="broken value"):   # --debug: the traceback of an expected error too
        cai(["--debug", "boom", "value"])
