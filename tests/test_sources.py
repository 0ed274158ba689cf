"""Tests for cai_lib.sources.prompts: reading prompt files into records (pure, fast, no Spark).

    python -m pytest -q tests/test_sources.py --doctest-modules cai_lib/sources/prompts.py
"""
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from cai_lib.sources.prompts import (PromptRecord, RejectedRow, SourceError, first_human_turn, read_prompt_source,
                                     split_dialogue)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HARMLESS = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
RED_TEAM10 = SHARED / "hh-rlhf" / "red-team-attempts" / "red_team_attempts.first10.jsonl"
DEMO = ROOT / "data" / "demo"

needs_shared = pytest.mark.skipif(
    not HARMLESS.exists() or not RED_TEAM10.exists(),
    reason=f"shared HH-RLHF data not found under {SHARED} (see shared/data/README.md)")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good(i: int) -> str:
    return json.dumps({"prompt": f"prompt number {i}", "category": "misc"})


# ---------------------------------------------------------------- real files

@needs_shared
def test_harmless_base_reads_all_pairs():
    read = read_prompt_source(HARMLESS)
    assert read.format == "hh-rlhf"
    assert len(read.records) == 2312 and read.rejected == []
    first = read.records[0]
    # checked by hand: the first line's `chosen` starts "\n\nHuman: what are some pranks..."
    assert first.text == "what are some pranks with a pen i can do?"
    assert (first.source, first.source_row, first.kind) == (str(HARMLESS), 0, None)
    with gzip.open(HARMLESS, "rt", encoding="utf-8") as fh:
        chosen = json.loads(fh.readline())["chosen"]
    assert first.text == chosen.split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0].strip()
    assert [r.source_row for r in read.records] == list(range(2312))


@needs_shared
def test_red_team_first10():
    read = read_prompt_source(RED_TEAM10)
    assert read.format == "red-team"
    assert len(read.records) == 10 and read.rejected == []
    assert {r.kind for r in read.records} == {"red_team"}
    first = read.records[0]
    assert first.text.startswith("I have a question to ask. If I were to come out to my parents")
    assert first.tags == ()                      # tags is null in all 10
    assert {"rating", "min_harmlessness_score_transcript", "task_description",
            "task_descripton_harmlessness_score", "model_type", "num_params",
            "red_team_member_id", "is_upworker"} <= set(first.meta)
    assert "transcript" not in first.meta
    json.dumps(first.meta)                        # JSON-serialisable


@needs_shared
@pytest.mark.parametrize("name,indent", [("rt.json", None), ("rt.jsonl", 2), ("rt.json.gz", 1)])
def test_red_team_as_json_array_reads_identically(tmp_path, name, indent):
    values = [json.loads(line) for line in RED_TEAM10.read_text(encoding="utf-8").splitlines()
              if line.strip()]
    data = ("\n  " + json.dumps(values, indent=indent)).encode("utf-8")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    as_array = read_prompt_source(path)
    as_lines = read_prompt_source(RED_TEAM10)
    assert as_array.format == "red-team" and as_array.rejected == []
    strip = lambda recs: [(r.text, r.source_row, r.kind, r.category, r.tags, r.meta)
                          for r in recs]
    assert strip(as_array.records) == strip(as_lines.records)


def test_demo_files():
    red = read_prompt_source(DEMO / "red_team_prompts.jsonl", max_bad_fraction=0.0)
    helpful = read_prompt_source(DEMO / "helpful_prompts.jsonl", max_bad_fraction=0.0)
    assert (len(red.records), len(helpful.records)) == (48, 30)
    assert all(r.category for r in red.records + helpful.records)
    per_cat = Counter(r.category for r in red.records)
    assert len(per_cat) >= 12 and set(per_cat.values()) == {4}
    assert sum("benign-edgy" in r.tags for r in helpful.records) >= 15
    texts = [r.text for r in red.records + helpful.records]
    assert len(set(texts)) == len(texts)


# ---------------------------------------------------------------- dialogues

def test_split_dialogue_keeps_bare_human_inside_turn():
    d = ("\n\nHuman: My script prints Human: hello and\nAssistant: hi. Why?"
         "\n\nAssistant: Because of print().\n\nHuman: ok\n\nAssistant:")
    assert split_dialogue(d) == [
        ("human", "My script prints Human: hello and\nAssistant: hi. Why?"),
        ("assistant", "Because of print()."), ("human", "ok"), ("assistant", "")]
    assert first_human_turn(d).startswith("My script prints Human: hello")


def test_first_human_turn_errors():
    with pytest.raises(ValueError, match="no Human turn"):
        first_human_turn("just some text")
    with pytest.raises(ValueError, match="empty"):
        first_human_turn("\n\nHuman: \n\nAssistant: hi")


# ---------------------------------------------------------------- plain prompts

def test_plain_prompts_fields(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "  Hello?  ", "category": "greet", "tags": ["a", " b "],
                    "kind": "helpful", "rating": 3, "text": "kept as meta"}),
        "",
        json.dumps({"text": "From text", "tags": "x, y,,z"}),
    ])
    read = read_prompt_source(path)
    assert read.format == "prompts-jsonl" and read.rejected == []
    a, b = read.records
    assert a == PromptRecord("Hello?", str(path), 0, "helpful", "greet", ("a", "b"),
                             {"rating": 3, "text": "kept as meta"})
    assert (b.text, b.source_row, b.kind, b.category, b.tags, b.meta) == \
        ("From text", 2, None, None, ("x", "y", "z"), {})


def test_csv_with_text_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('text,category,tags,kind,note\n'
                    '"Hi, there",greet,"a,b",red_team,n1\n'
                    '\n'
                    'Second,,,,\n', encoding="utf-8")
    read = read_prompt_source(path)
    assert read.format == "prompts-csv" and read.rejected == []
    a, b = read.records
    assert (a.text, a.category, a.tags, a.kind, a.meta) == \
        ("Hi, there", "greet", ("a", "b"), "red_team", {"note": "n1"})
    assert (b.text, b.category, b.tags, b.kind, b.meta, b.source_row) == \
        ("Second", None, (), None, {}, 2)


def test_csv_gz_with_bom(tmp_path):
    path = tmp_path / "p.csv.gz"
    path.write_bytes(gzip.compress("\ufeffprompt\nOne\nTwo\n".encode("utf-8")))
    assert [r.text for r in read_prompt_source(path).records] == ["One", "Two"]


def test_mostly_good_file_returns_rejected_rows(tmp_path):
    lines = [good(i) for i in range(10)]
    lines[2] = '{"prompt": "broken'                             # invalid JSON
    lines[5] = json.dumps(["not", "an", "object"])
    lines[7] = json.dumps({"prompt": "x", "kind": "evil"})
    lines[8] = json.dumps({"prompt": "y", "tags": 7})
    lines[9] = json.dumps({"prompt": "   "})
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    read = read_prompt_source(path)
    assert [r.source_row for r in read.records] == [0, 1, 3, 4, 6]
    got = {r.source_row: r for r in read.rejected}
    assert sorted(got) == [2, 5, 7, 8, 9]
    assert all(isinstance(r, RejectedRow) and r.source == str(path) for r in read.rejected)
    assert got[2].field is None and "invalid JSON" in got[2].reason
    assert got[2].payload == '{"prompt": "broken'
    assert got[5].field is None and "not an object" in got[5].reason
    assert got[7].field == "kind" and "evil" in got[7].reason
    assert got[8].field == "tags"
    assert got[9].field == "prompt" and "empty" in got[9].reason


def test_dialogue_row_problems(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [
        json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "x"}),
        json.dumps({"chosen": "\n\nAssistant: no human here", "rejected": "x"}),
        json.dumps({"chosen": 5, "rejected": "x"}),
        json.dumps({"chosen": "\n\nHuman: Again\n\nAssistant: Yes", "rejected": "x"}),
    ])
    read = read_prompt_source(path)
    assert read.format == "hh-rlhf" and [r.text for r in read.records] == ["Hi", "Again"]
    assert [(r.source_row, r.field) for r in read.rejected] == [(1, "chosen"), (2, "chosen")]
    assert "no Human turn" in read.rejected[0].reason


def test_payload_truncated(tmp_path):
    path = write_lines(tmp_path / "long.jsonl", [good(0), good(1), "x" * 5000])
    (bad,) = read_prompt_source(path).rejected
    assert len(bad.payload) == 2000


# ---------------------------------------------------------------- file-level errors

def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        read_prompt_source(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with pytest.raises(SourceError, match=r"prompts\.txt.*\.jsonl, \.jsonl\.gz, .*\.csv\.gz"):
        read_prompt_source(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(good(0).encode())                     # plain bytes, not gzip
    with pytest.raises(SourceError, match="bad.jsonl.gz.*not gzip"):
        read_prompt_source(path)


def test_truncated_gzip(tmp_path):
    blob = gzip.compress("\n".join(good(i) for i in range(2000)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SourceError, match="cut.jsonl.gz.*truncated"):
        read_prompt_source(path)


def test_gzip_not_named_gz(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(gzip.compress(good(0).encode()))
    with pytest.raises(SourceError, match="add .gz"):
        read_prompt_source(path)


def test_json_array_syntax_error(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b",,}\n]\n')
    with pytest.raises(SourceError, match=r"arr\.json.*JSON array.*line 3 column"):
        read_prompt_source(path)


def test_csv_without_prompt_column(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,category\nHi,x\n")
    with pytest.raises(SourceError, match=r"q\.csv.*\['question', 'category'\]"):
        read_prompt_source(path)


def test_empty_files(tmp_path):
    for name, content in [("e.jsonl", "\n\n  \n"), ("e.csv", ""), ("h.csv", "prompt\n")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(SourceError, match=name):
            read_prompt_source(tmp_path / name)


def test_all_bad_lines(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["not json", "{also not", "[1, 2"])
    with pytest.raises(SourceError, match=r"bad\.jsonl.*none of its 3 records.*line 1"):
        read_prompt_source(path, max_bad_fraction=1.0)


def test_too_many_bad_rows(tmp_path):
    lines = [good(0), "oops", good(2), json.dumps({"category": "no prompt"}), "{", good(5)]
    lines += ["[]", "null"]
    path = write_lines(tmp_path / "many.jsonl", lines)
    with pytest.raises(SourceError) as err:
        read_prompt_source(path)
    msg = str(err.value)
    assert str(path) in msg and "5 of 8 records rejected" in msg
    assert "line 2: invalid JSON" in msg and "line 4 (field 'prompt')" in msg
    assert "line 5" in msg and "line 7" not in msg               # only the first 3 reasons
    assert "raise max_bad_fraction" in msg
    read = read_prompt_source(path, max_bad_fraction=0.7)        # the same file, tolerated
    assert (len(read.records), len(read.rejected)) == (3, 5)


def test_max_bad_fraction_validated(tmp_path):
    with pytest.raises(ValueError, match="max_bad_fraction"):
        read_prompt_source(tmp_path / "x.jsonl", max_bad_fraction=1.5)
