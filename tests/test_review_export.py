"""Review in Label Studio and Argilla: `cai review export` on a small lake, hand-written annotation files
imported back as exact review_events rows (twice: they land once), and bad rows named by row and field."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from cai_lib.lake.tables import Lake
from cai_lib.review.exchange import (AnnotationError, ai_choice, argilla_record, export_order, label_studio_task,
                                     new_rows, read_annotations, review_rows)
from cai_lib.review.queue import QueueRules, comparisons, label, rank
from jobs.cli import main as cai
from tests.test_review_app import cid, write_lake

T0 = datetime(2026, 2, 1, tzinfo=timezone.utc)
@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    return write_lake(spark, tmp_path_factory.mktemp("exchange") / "lake")


REASONS = {"s": ["swap_inconsistent", "audit"], "n": ["near_half", "audit"], "c": ["audit"]}


def test_a_task_shows_the_sides_in_the_export_order_with_the_ai_label_as_prediction_and_suggestion():
    [item] = rank(comparisons([label("p", "ab", 0.42), label("p", "ba", 0.42)]), QueueRules(audit_fraction=0.0))
    c = item.comparison
    texts = {"p-a": "answer A", "p-b": "answer B"}
    order = export_order(c.comparison_id)
    first, second = ("answer A", "answer B") if order == "ab" else ("answer B", "answer A")
    ls = label_studio_task(item, "Q?", texts, "harm: be kind", T0)
    assert ls["data"] == {"principle": "harm: be kind", "prompt": "Q?", "response_1": first, "response_2": second,
                          "comparison_id": c.comparison_id, "shown_order": order, "queue_reasons": ["near_half"],
                          "exported_at": "2026-02-01T00:00:00+00:00"}
    side = {"ab": "right", "ba": "left"}[order]           # the AI prefers B (p = 0.42): shown second when ab
    assert ls["predictions"] == [{"model_version": "ai_label ffffffffffff constitution cccccccccccc", "score": 0.58,
                                  "result": [{"from_name": "preference", "to_name": "response_1,response_2",
                                              "type": "pairwise", "value": {"selected": side}}]}]
    ar = argilla_record(item, "Q?", texts, "harm: be kind", T0)
    assert ar["id"] == c.comparison_id and ar["fields"] == {k: ls["data"][k] for k in ar["fields"]}
    assert ar["suggestions"] == {"preference": {"value": {"right": "response_2", "left": "response_1"}[side],
                                                "score": 0.58, "agent": ls["predictions"][0]["model_version"]}}
    assert ar["metadata"]["queue_reasons"] == "near_half" and ar["responses"] == {}
    assert ai_choice(0.5, "ba") == ("tie", 0.5)


def ls_annotation(who: str, result: list, at: str = "2026-02-02T10:00:00Z", **kw) -> dict:
    return {"id": 1, "completed_by": {"id": 7, "email": who}, "result": result, "was_cancelled": False,
            "created_at": at, "updated_at": at, **kw}


PICK = {"left": [{"from_name": "preference", "to_name": "response_1,response_2", "type": "pairwise",
                  "value": {"selected": "left"}}],
        "right": [{"type": "pairwise", "from_name": "preference", "value": {"selected": "right"}}],
        "tie": [{"from_name": "neither", "to_name": "prompt", "type": "choices", "value": {"choices": ["tie"]}}]}


def test_label_studio_export_and_import_back_exact_rows_once(lake, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert cai(["review", "export", "--lake", str(lake), "--format", "label-studio", "--out", str(out),
                "--audit-fraction", "1.0"]) == 0
    tasks = json.loads(out.read_text())
    assert [(t["data"]["comparison_id"], t["data"]["queue_reasons"]) for t in tasks] == [
        (cid(p), REASONS[p]) for p in "snc"]
    assert [t["predictions"][0]["result"][0]["value"] for t in tasks] == [{"selected": "left"}, {"selected": "left"},
                                                                          {"selected": "right"}]   # c: ba, p 0.9
    assert [t["data"]["shown_order"] for t in tasks] == ["ab", "ab", "ba"]
    assert tasks[0]["data"]["response_2"].startswith("<script>")      # the data as is: Label Studio's Text shows text
    assert '<Pairwise name="preference" toName="response_1,response_2"/>' in (
        tmp_path / "tasks.label_config.xml").read_text()
    tasks[0]["annotations"] = [ls_annotation("ann@x", PICK["left"]),
                               ls_annotation("bob@x", PICK["tie"] + [{"from_name": "note", "type": "textarea",
                                                                      "value": {"text": ["same"]}}])]
    tasks[2]["annotations"] = [ls_annotation("ann@x", PICK["left"], "2026-02-03T09:30:00+01:00"),
                               ls_annotation("cy@x", PICK["right"], was_cancelled=True)]
    done = tmp_path / "annotated.json"
    done.write_text(json.dumps(tasks))
    capsys.readouterr()
    for _ in range(2):
        assert cai(["review", "import", "--lake", str(lake), "--format", "label-studio", str(done)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("3 verdicts in " + str(done) + " (1 skipped: cancelled or not submitted); 3 new in "
                             "review_events, 0 there already")
    assert lines[1].endswith("0 new in review_events, 3 there already")
    got = sorted((r["comparison_id"], r["reviewer"], r["verdict"], r["shown_order"], r["queue_reasons"], r["note"],
                  r["verdict_at"]) for r in Lake(lake).read("review_events").to_pylist() if "@" in r["reviewer"])
    assert got == sorted([(cid("s"), "ann@x", "A", "ab", REASONS["s"], None, datetime(2026, 2, 2, 10, tzinfo=timezone.utc)),
                          (cid("s"), "bob@x", "tie", "ab", REASONS["s"], "same",
                           datetime(2026, 2, 2, 10, tzinfo=timezone.utc)),
                          (cid("c"), "ann@x", "B", "ba", REASONS["c"], None,
                           datetime(2026, 2, 3, 8, 30, tzinfo=timezone.utc))])


def test_argilla_export_and_import_back_exact_rows_once(lake, tmp_path, capsys):
    out = tmp_path / "records.json"
    assert cai(["review", "export", "--lake", str(lake), "--format", "argilla", "--out", str(out),
                "--audit-fraction", "1.0"]) == 0
    records = json.loads(out.read_text())
    assert [(r["id"], r["metadata"]["queue_reasons"], r["suggestions"]["preference"]["value"]) for r in records] == [
        (cid("s"), "swap_inconsistent,audit", "response_1"), (cid("n"), "near_half,audit", "response_1"),
        (cid("c"), "audit", "response_2")]
    exported_at = datetime.fromisoformat(records[0]["metadata"]["exported_at"])
    records[1]["responses"] = {"preference": [{"value": "response_2", "user_id": "u-dee"},
                                              {"value": "both_bad", "user_id": "u-eve", "status": "draft"}],
                               "note": [{"value": "2 is clearer", "user_id": "u-dee"}]}
    records[2]["responses"] = {"preference": [{"value": "both_bad", "user_id": "u-dee"}]}
    done = tmp_path / "annotated.json"
    done.write_text(json.dumps(records))
    capsys.readouterr()
    for _ in range(2):
        assert cai(["review", "import", "--lake", str(lake), "--format", "argilla", str(done),
                    "--reviewer-field", "user_id"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("2 verdicts in " + str(done) + " (1 skipped: cancelled or not submitted); 2 new in "
                             "review_events, 0 there already")
    assert lines[1].endswith("0 new in review_events, 2 there already")
    got = sorted((r["comparison_id"], r["reviewer"], r["verdict"], r["shown_order"], r["queue_reasons"], r["note"],
                  r["verdict_at"]) for r in Lake(lake).read("review_events").to_pylist() if r["reviewer"] == "u-dee")
    assert got == sorted([(cid("n"), "u-dee", "B", "ab", REASONS["n"], "2 is clearer", exported_at),
                          (cid("c"), "u-dee", "both_bad", "ba", REASONS["c"], None, exported_at)])

    records[2]["responses"]["preference"][0]["value"] = "response_1"     # changed after its import (shown ba: B): refused
    done.write_text(json.dumps(records))
    assert cai(["review", "import", "--lake", str(lake), "--format", "argilla", str(done)]) == 1
    assert "reads B, but review_events (or this file) has both_bad for the same verdict id" in capsys.readouterr().err


def task(**data) -> dict:
    return {"data": {"comparison_id": "c1", "shown_order": "ab", "queue_reasons": ["audit"], **data}}


@pytest.mark.parametrize("tasks, field, message", [
    ([{**task(), "annotations": [{"result": PICK["left"], "updated_at": "2026-02-02T10:00:00Z"}]}],
     "completed_by.email", "f.json: task 1 (c1), annotation 1: no field 'completed_by.email'"),
    ([{**task(), "annotations": [ls_annotation("ann", PICK["left"] + PICK["tie"])]}], None,
     "f.json: task 1 (c1), annotation 1: field 'result' holds 2 verdicts (['first', 'tie'])"),
    ([{**task(), "annotations": [ls_annotation("ann", PICK["left"], at="yesterday")]}], None,
     "f.json: task 1 (c1), annotation 1: field 'updated_at' is 'yesterday', not an ISO time"),
    ([{**task(), "annotations": [{**ls_annotation("ann", PICK["left"]), "completed_by": {"email": None}}]}], None,
     "f.json: task 1 (c1), annotation 1: field 'completed_by.email' is None, not a reviewer name"),
    ([task(), task(shown_order="up")], None, "f.json: task 2: field 'shown_order' is 'up'"),
    ([task(queue_reasons=["hunch"])], None, "f.json: task 1: field 'queue_reasons' is ['hunch']"),
    ({"tasks": []}, None, "f.json: expected a JSON list of Label Studio tasks, got dict"),
])
def test_a_bad_label_studio_row_is_named_by_row_and_field(tasks, field, message):
    with pytest.raises(AnnotationError) as exc:
        read_annotations("label-studio", tasks, field, "f.json")
    assert str(exc.value).startswith(message)


def test_a_bad_argilla_row_and_an_unknown_comparison_are_named():
    meta = {"comparison_id": "c1", "shown_order": "ba", "queue_reasons": "audit", "exported_at": "2026-02-01T00:00:00Z"}
    bad = [{"id": "c1", "metadata": meta, "responses": {"preference": [{"value": "A", "user_id": "u"}]}}]
    with pytest.raises(AnnotationError, match=r"f.json: record 1 \(c1\), response 1: field 'value' is 'A'"):
        read_annotations("argilla", bad, None, "f.json")
    good = [{"id": "c1", "metadata": meta, "responses": {"preference": [{"value": "tie", "user_id": "u"}]}}]
    annotations, skipped = read_annotations("argilla", good, None, "f.json")
    assert (skipped, [(a.comparison_id, a.choice, a.shown_order, a.reviewer) for a in annotations]) == (
        0, [("c1", "tie", "ba", "u")])
    with pytest.raises(AnnotationError, match="record 1 .c1., response 1: comparison c1 is not in this lake's "
                                              "label_events"):
        review_rows(annotations, {}, T0, "f.json")
    c = comparisons([label("p", "ab", 0.3)])[0]
    row = review_rows([annotations[0].__class__(**{**vars(annotations[0]), "comparison_id": c.comparison_id})],
                      {c.comparison_id: c}, T0, "f.json")[0]
    assert new_rows([row, row], {}, "f.json") == ([row], 0)
    assert new_rows([row], {row["event_id"]: "tie"}, "f.json") == ([], 1)
