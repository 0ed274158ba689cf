"""cai ingest: every accepted format into `prompts`, bad rows to `quarantine`, bad files write nothing."""
from __future__ import annotations

import gzip
import json

import pytest

from cai_lib.lake.tables import Lake
from cai_lib.sources.prompts import SourceError
from jobs.cli import main as cai
from tests.conftest import DEMO_HELPFUL, DEMO_RED, SHARED, ingest, write_jsonl

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the checkout")


def test_demo_files_ingest_with_deterministic_ids_and_no_duplicates(tmp_path):
    lake = tmp_path / "lake"
    assert ingest(lake, DEMO_RED, "red_team")["inserted"] == 48
    assert ingest(lake, DEMO_HELPFUL, "helpful")["inserted"] == 30
    again = ingest(lake, DEMO_RED, "red_team")
    assert again["inserted"] == 0 and again["already_present"] == 48
    t = Lake(lake).read("prompts")
    assert t.num_rows == 78 and len(set(t["prompt_id"].to_pylist())) == 78
    assert set(t["kind"].to_pylist()) == {"red_team", "helpful"}
    assert len({c for c in t["category"].to_pylist()}) >= 12


def test_split_is_a_stable_function_of_the_id(tmp_path):
    from jobs.ingest import IngestConfig, run
    run(None, IngestConfig(lake=str(tmp_path / "a"), source=str(DEMO_RED), kind="red_team", test_fraction=0.25))
    t = Lake(tmp_path / "a").read("prompts")
    splits = dict(zip(t["prompt_id"].to_pylist(), t["split"].to_pylist()))
    assert 0 < list(splits.values()).count("test") < 48
    run(None, IngestConfig(lake=str(tmp_path / "b"), source=str(DEMO_RED), kind="red_team", test_fraction=0.25))
    t2 = Lake(tmp_path / "b").read("prompts")
    assert dict(zip(t2["prompt_id"].to_pylist(), t2["split"].to_pylist())) == splits


def test_a_source_can_be_an_evaluation_set_and_a_seeded_sample(tmp_path):
    from jobs.ingest import IngestConfig, run
    sources = [{"path": str(DEMO_RED), "kind": "red_team"},
               {"path": str(DEMO_HELPFUL), "kind": "helpful", "split": "test", "limit": 5, "seed": 3}]
    run(None, IngestConfig(lake=str(tmp_path / "lake"), params="/nonexistent.yaml", sources=sources, test_fraction=0.0))
    rows = Lake(tmp_path / "lake").read("prompts").to_pylist()
    helpful = sorted(r["source_row"] for r in rows if r["kind"] == "helpful")
    assert {r["split"] for r in rows if r["kind"] == "red_team"} == {"train"} and len(rows) == 48 + 5
    assert {r["split"] for r in rows if r["kind"] == "helpful"} == {"test"}
    import random
    assert helpful == sorted(random.Random(3).sample(range(30), 5))   # the same seed, the same sample
    # the same source as flags (what the Databricks bundle's ingest tasks pass)
    assert cai(["ingest", "--lake", str(tmp_path / "flags"), "--params", "/dev/null", "--source",
                str(DEMO_HELPFUL), "--kind", "helpful", "--split", "test", "--limit", "5", "--sample-seed", "3"]) == 0
    flagged = Lake(tmp_path / "flags").read("prompts").to_pylist()
    assert sorted((r["source_row"], r["split"]) for r in flagged) == [(i, "test") for i in helpful]
    for bad, msg in (({"path": "x", "splits": "test"}, r"sources\[0\]: unknown keys \['splits'\]"),
                     ({"path": "x", "split": "eval"}, "split must be train or test"),
                     ({"path": "x", "limit": 0}, "limit must be a positive integer")):
        with pytest.raises(ValueError, match=msg):
            IngestConfig(lake=str(tmp_path / "l2"), params="/nonexistent.yaml", sources=[bad]).files()


@needs_shared
def test_hh_rlhf_and_red_team_formats(tmp_path):
    lake = tmp_path / "lake"
    out = ingest(lake, SHARED / "hh-rlhf/harmless-base/test.jsonl.gz", "red_team")
    # 2,312 pairs; many share their first human turn, which is one prompt after deduplication
    assert 1000 < out["inserted"] <= 2312 and out["inserted"] + 0 == Lake(lake).count("prompts")
    first = json.loads(gzip.open(SHARED / "hh-rlhf/harmless-base/test.jsonl.gz", "rt").readline())["chosen"]
    turn = first.split("\n\nHuman: ")[1].split("\n\nAssistant:")[0].strip()
    assert turn in Lake(lake).read("prompts")["text"].to_pylist()
    rt = ingest(lake, SHARED / "hh-rlhf/red-team-attempts/red_team_attempts.first10.jsonl", None)
    assert rt["read"] == 10
    meta = [json.loads(m) for m in Lake(lake).read("prompts")["meta"].to_pylist() if m]
    assert any("rating" in m for m in meta)


def test_hh_rlhf_without_kind_is_an_error_that_writes_nothing(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "x"}])
    with pytest.raises(SourceError, match="pass --kind red_team or --kind helpful"):
        ingest(tmp_path / "lake", f, None)
    assert not (tmp_path / "lake").exists()


def test_bad_rows_are_quarantined_with_their_reason(tmp_path):
    rows = [{"prompt": f"question number {i}?"} for i in range(8)]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" + json.dumps({"prompt": ""}) + "\n")
    out = ingest(tmp_path / "lake", f, "helpful")
    assert (out["inserted"], out["quarantined"]) == (8, 2)
    q = Lake(tmp_path / "lake").read("quarantine").to_pylist()
    assert sorted(r["source_row"] for r in q) == [8, 9] and all(r["reason"] for r in q)
    assert ingest(tmp_path / "lake", f, "helpful")["quarantined"] == 0  # re-ingest: nothing twice


def test_corrupt_file_is_a_clear_cli_error_and_writes_nothing(tmp_path, capsys):
    good = ingest(tmp_path / "lake", DEMO_HELPFUL, "helpful")
    before = Lake(tmp_path / "lake").snapshot()
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(b"this is not gzip at all")
    assert cai(["ingest", "--lake", str(tmp_path / "lake"), "--source", str(bad), "--kind", "red_team"]) == 1
    err = capsys.readouterr().err
    assert "broken.jsonl.gz" in err and "gzip" in err
    assert Lake(tmp_path / "lake").snapshot() == before and good["inserted"] == 30
