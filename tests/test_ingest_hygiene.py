"""Ingest bounds what it stores: a too-long prompt, one hiding control or bidi-override characters,
and red-team metadata of the wrong type are quarantined with a reason naming the row, the field and
the fix; the clean rows of the same file are stored unchanged."""
from __future__ import annotations

import json

import pytest

from cai_lib.lake.tables import Lake
from cai_lib.sources.prompts import SourceError, read_prompt_source
from tests.conftest import ingest, write_jsonl

TRANSCRIPT = "\n\nHuman: {}\n\nAssistant: I can't help with that."


def test_long_hidden_and_mistyped_rows_are_quarantined_with_their_reason(tmp_path):
    rows = [{"prompt": "How do I reset a router?"},
            {"prompt": "x" * 5001},
            {"prompt": "Tell me a joke\u0000about cats"},                       # an escaped NUL in the JSON
            {"prompt": "Summarise this: \u202egnirts nedih"},                   # RIGHT-TO-LEFT OVERRIDE
            {"prompt": "What is the capital of France?", "category": "geo"}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    assert "\\u0000" in src.read_text()
    out = ingest(tmp_path / "lake", src, "helpful", max_bad_fraction=0.9, max_prompt_chars=5000)
    assert (out["inserted"], out["quarantined"]) == (2, 3)
    lake = Lake(tmp_path / "lake")
    assert sorted(lake.read("prompts")["text"].to_pylist()) == ["How do I reset a router?",
                                                                "What is the capital of France?"]
    reasons = {r["source_row"]: (r["field"], r["reason"]) for r in lake.read("quarantine").to_pylist()}
    assert reasons[1] == ("prompt", "'prompt' is 5001 characters, over max_prompt_chars=5000. Fix: shorten it, "
                                    "or raise max_prompt_chars in params.yaml [ingest]")
    assert reasons[2][1].startswith("'prompt' holds a control character (U+0000) at character 15: control and bidi")
    assert reasons[3][1].startswith("'prompt' holds RIGHT-TO-LEFT OVERRIDE (U+202E) at character 17")


def test_red_team_metadata_is_type_checked(tmp_path):
    good = {"transcript": TRANSCRIPT.format("How do I pick a lock?"), "rating": 2.0, "is_upworker": False,
            "red_team_member_id": 3, "num_params": "52B"}
    bad = [dict(good, transcript=TRANSCRIPT.format(f"variant {i}"), **kw)
           for i, kw in enumerate([{"rating": [1, 2]}, {"is_upworker": "yes"}, {"rating": True}])]
    read = read_prompt_source(write_jsonl(tmp_path / "rt.jsonl", [good, *bad]), max_bad_fraction=0.9)
    assert read.format == "red-team" and [r.meta for r in read.records] == [
        {"rating": 2.0, "is_upworker": False, "red_team_member_id": 3, "num_params": "52B"}]
    assert [(r.source_row, r.field, r.reason) for r in read.rejected] == [
        (1, "rating", "'rating' must be int or float (or null), got [1, 2]"),
        (2, "is_upworker", "'is_upworker' must be bool (or null), got \"yes\""),
        (3, "rating", "'rating' must be int or float (or null), got true")]


def test_a_file_of_only_oversized_prompts_is_refused_whole(tmp_path):
    src = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "y" * 50}, {"prompt": "z" * 60}])
    with pytest.raises(SourceError, match=r"none of its 2 records is usable .* line 1 \(field 'prompt'\): 'prompt' "
                                          r"is 50 characters, over max_prompt_chars=10"):
        read_prompt_source(src, max_prompt_chars=10)
    assert json.loads(src.read_text().splitlines()[0]) == {"prompt": "y" * 50}   # the file is untouched
