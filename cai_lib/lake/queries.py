"""What a generation job reads from the lake before it plans: the prompts to work on, the events already there."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def select_prompts(lake, splits: list[str], limit: int | None,
                   kinds: tuple[str, ...] = ("red_team", "helpful")) -> tuple[pa.Table, set[str]]:
    """The prompts of `kinds` in `splits`, and the ids to generate for now (`limit` per kind)."""
    prompts = lake.read("prompts")
    if prompts.num_rows == 0:
        raise ValueError(f"no prompts in lake {lake.root}: run `cai ingest --lake {lake.root}` first")
    prompts = prompts.filter(pc.is_in(prompts["split"], pa.array(splits)))
    prompts = prompts.filter(pc.is_in(prompts["kind"], pa.array(list(kinds)))).sort_by("prompt_id")
    chosen = prompts
    if limit is not None:
        chosen = pa.concat_tables([prompts.filter(pc.equal(prompts["kind"], k)).slice(0, limit) for k in kinds])
    return prompts, set(chosen["prompt_id"].to_pylist())


def known_events(lake, ids: set[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Texts of successful events and failure counts, for the planned ids only."""
    ev = lake.read("generation_events", columns=["target_event_id", "status", "text"])
    ev = ev.filter(pc.is_in(ev["target_event_id"], pa.array(sorted(ids), pa.string())))
    texts, failures = {}, {}
    for r in ev.to_pylist():
        if r["status"] == "ok":
            texts[r["target_event_id"]] = r["text"]
        else:
            failures[r["target_event_id"]] = failures.get(r["target_event_id"], 0) + 1
    return texts, failures


def training_prompt_texts(lake) -> dict[str, str]:
    """{normalised text: prompt_id} of the lake's train-split prompts (empty if it has none): what
    no evaluation may use (`sources.eval_data.read_disjoint_pairs`, the labels gate's contamination check)."""
    from cai_lib.ids import normalise_text
    if not lake.exists("prompts"):
        return {}
    rows = lake.read("prompts", columns=["prompt_id", "text", "split"]).to_pylist()
    return {normalise_text(r["text"]): r["prompt_id"] for r in rows if r["split"] == "train"}
