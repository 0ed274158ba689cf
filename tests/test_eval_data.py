"""Tests for cai_lib.sources.eval_data: readers for HH-RLHF pairs and the HHH comparisons.

    python -m pytest -q tests/test_eval_data.py --doctest-modules cai_lib/sources/eval_data.py
"""
import gzip
import json
from pathlib import Path

import pytest

from cai_lib.sources.eval_data import EvalDataError, HHHItem, HumanPair, read_hh_pairs, read_hhh

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HARMLESS = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HHH = SHARED / "constitutional-harmlessness-paper" / "evals" / "438HHHEvaluations.jsonl"
PREFIX_MISMATCH = {1254, 1688, 1950, 1952, 2036}       # shared/data/README.md, harmless-base

needs_harmless = pytest.mark.skipif(not HARMLESS.exists(),
                                    reason=f"{HARMLESS} absent (see shared/data/README.md)")
needs_hhh = pytest.mark.skipif(not HHH.exists(), reason=f"{HHH} absent (see shared/data/README.md)")


def dialogue(*turns: str) -> str:
    """dialogue('hi', 'hello', 'bye', 'ciao') -> alternating Human/Assistant turns."""
    roles = ("Human", "Assistant")
    return "".join(f"\n\n{roles[i % 2]}: {t}" for i, t in enumerate(turns))


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def hhh_row(correct=" (A)", incorrect=" (B)") -> dict:
    return {"prompt": "...Options:\n (A) [[[x]]]\n (B) [[[y]]]\n\nThe answer is:",
            "corrects": [correct], "incorrects": [incorrect],
            "text_correct": dialogue("q", "x"), "text_incorrect": dialogue("q", "y")}


# ---------------------------------------------------------------- real files

@needs_harmless
def test_harmless_base_every_row_accounted_for():
    pairs, rejected = read_hh_pairs(HARMLESS)
    assert len(pairs) + len(rejected) == 2312
    rows = {r["row"] for r in rejected}
    assert PREFIX_MISMATCH <= rows
    assert all("prefixes differ" in r["reason"] for r in rejected if r["row"] in PREFIX_MISMATCH)
    # the 4 harmless `chosen` strings ending with an empty assistant turn (README)
    assert sum("chosen response is empty" in r["reason"] for r in rejected) == 4
    assert not rows & {p.row for p in pairs}
    p = pairs[0]
    assert isinstance(p, HumanPair) and p.source == str(HARMLESS)
    assert p.prompt.endswith("\n\nAssistant:") and p.chosen and p.rejected != p.chosen
    assert p.context[0][0] == "human" and p.context[-1][0] == "human"
    assert all(role in ("human", "assistant") for role, _ in p.context)


@needs_harmless
def test_seeded_sample_is_deterministic():
    a, rej_a = read_hh_pairs(HARMLESS, limit=50, seed=1)
    b, _ = read_hh_pairs(HARMLESS, limit=50, seed=1)
    c, _ = read_hh_pairs(HARMLESS, limit=50, seed=2)
    first, _ = read_hh_pairs(HARMLESS, limit=50)
    assert len(a) == len(c) == len(first) == 50
    assert [p.row for p in a] == [p.row for p in b]
    assert [p.row for p in a] != [p.row for p in c]
    assert [p.row for p in a] == sorted(p.row for p in a)          # returned in file order
    assert [p.row for p in first] == list(range(50))               # no invalid row before 50
    assert len(rej_a) == 9                                          # rejected are never sampled


@needs_hhh
def test_read_hhh_counts():
    items = read_hhh(HHH)
    assert len(items) == 438 and all(isinstance(i, HHHItem) for i in items)
    assert sum(i.correct == " (A)" for i in items) == 228
    assert sum(i.correct == " (B)" for i in items) == 210
    assert all({i.correct, i.incorrect} == {" (A)", " (B)"} for i in items)
    assert all(i.prompt.rstrip().endswith("The answer is:") for i in items)
    assert [i.row for i in items] == list(range(438))


# ---------------------------------------------------------------- small files

def test_hh_pairs_split_and_reasons(tmp_path):
    rows = [
        {"chosen": dialogue("hi", "hello", "bye", " ciao "),
         "rejected": dialogue("hi", "hello", "bye", "go away")},
        {"chosen": dialogue("a", "b"), "rejected": dialogue("DIFFERENT", "c")},        # prefix
        {"chosen": dialogue("a", ""), "rejected": dialogue("a", "c")},                # empty
        {"chosen": dialogue("a", "same"), "rejected": dialogue("a", "same")},         # equal
        {"chosen": dialogue("no reply"), "rejected": dialogue("a", "c")},             # no marker
    ]
    pairs, rejected = read_hh_pairs(write_jsonl(tmp_path / "p.jsonl.gz", rows, gz=True))
    assert pairs == [HumanPair(prompt=dialogue("hi", "hello", "bye") + "\n\nAssistant:",
                               context=[("human", "hi"), ("assistant", "hello"), ("human", "bye")],
                               chosen="ciao", rejected="go away",
                               source=str(tmp_path / "p.jsonl.gz"), row=0)]
    assert [r["row"] for r in rejected] == [1, 2, 3, 4]
    assert set(rejected[0]) == {"row", "reason"}
    assert "prefixes differ" in rejected[0]["reason"]
    assert "chosen response is empty" in rejected[1]["reason"]
    assert "chosen == rejected" in rejected[2]["reason"]
    assert "marker in chosen" in rejected[3]["reason"]


def test_hh_pairs_limit_without_seed_and_oversized(tmp_path):
    rows = [{"chosen": dialogue(f"q{i}", "yes"), "rejected": dialogue(f"q{i}", "no")}
            for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [p.row for p in read_hh_pairs(path, limit=2)[0]] == [0, 1]
    assert len(read_hh_pairs(path, limit=99, seed=3)[0]) == 5
    assert read_hh_pairs(path, limit=0)[0] == []
    with pytest.raises(ValueError, match="limit must be"):
        read_hh_pairs(path, limit=-1)


def test_missing_file_names_file_and_fix(tmp_path):
    for reader in (read_hh_pairs, read_hhh):
        with pytest.raises(ValueError, match=r"nope\.jsonl: no such file\. Fix"):
            reader(tmp_path / "nope.jsonl")
    with pytest.raises(EvalDataError, match="not a regular file"):
        read_hhh(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    # chmod 000 does not stop root (CI containers), so make open() fail like a permission error
    import cai_lib.sources.eval_data as eval_data

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    path = write_jsonl(tmp_path / "locked.jsonl", [hhh_row()])
    monkeypatch.setattr(eval_data, "open", denied, raising=False)
    with pytest.raises(EvalDataError, match=r"locked\.jsonl: cannot be read .*Permission denied"):
        read_hhh(path)


def test_corrupt_gzip_and_bad_json(tmp_path):
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"chosen": "x"}\n' * 100)[:40])
    with pytest.raises(EvalDataError, match=r"t\.jsonl\.gz"):
        read_hh_pairs(truncated)
    bad = write_jsonl(tmp_path / "bad.jsonl", [hhh_row(), "{not json"])
    with pytest.raises(EvalDataError, match=r"row 1 \(line 2\) is not valid"):
        read_hhh(bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(EvalDataError, match="holds no records"):
        read_hhh(empty)


def test_missing_field_names_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": dialogue("a", "b"), "rejected": dialogue("a", "c")},
        {"chosen": dialogue("a", "b")}])
    with pytest.raises(EvalDataError, match="row 1 field 'rejected' is missing"):
        read_hh_pairs(path)
    row = hhh_row()
    del row["text_incorrect"]
    with pytest.raises(EvalDataError, match="row 1 field 'text_incorrect' is missing"):
        read_hhh(write_jsonl(tmp_path / "hhh.jsonl", [hhh_row(), row]))
    row = hhh_row()
    row["corrects"] = " (A)"
    with pytest.raises(EvalDataError, match="row 0 field 'corrects' is a str"):
        read_hhh(write_jsonl(tmp_path / "hhh2.jsonl", [row]))


def test_read_hhh_small(tmp_path):
    items = read_hhh(write_jsonl(tmp_path / "h.jsonl", [hhh_row(), "", hhh_row(" (B)", " (A)")]))
    assert [(i.row, i.correct, i.incorrect) for i in items] == [
        (0, " (A)", " (B)"), (2, " (B)", " (A)")]
    assert items[0].text_correct == dialogue("q", "x")
