"""What training may read: the derived datasets minus every row a gate quarantined.

Quarantine never deletes events; it lists (table, key) pairs. An SL row is out when its final
generation event is quarantined; a preference pair is out when the pair itself or any of
the label events behind it is. Rows left out are counted, never dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass

from cai_lib.lake.tables import Lake
from cai_lib.quality.frames import quarantined


@dataclass
class TrainingRows:
    rows: list[dict]
    excluded: int          # rows a gate quarantined
    table: str
    version: int | None    # the Delta version read


def sl_rows(lake: Lake, splits=("train",)) -> TrainingRows:
    """`sl_dataset` rows of `splits` as {key, prompt, response, ...}, minus quarantined chains."""
    bad = {k for t, k in quarantined(lake) if t == "generation_events"}
    version = lake.version("sl_dataset")
    rows = [r for r in lake.read("sl_dataset", version=version).to_pylist() if r["split"] in splits]
    keep = [{**r, "key": r["prompt_id"]} for r in rows if r["final_event_id"] not in bad]
    return TrainingRows(keep, len(rows) - len(keep), "sl_dataset", version)


def preference_rows(lake: Lake) -> TrainingRows:
    """`preference_dataset` pairs minus those a gate quarantined (the pair or one of its labels)."""
    bad = quarantined(lake)
    bad_pairs = {k for t, k in bad if t == "preference_dataset"}
    bad_labels = {k for t, k in bad if t == "label_events"}
    version = lake.version("preference_dataset")
    rows = lake.read("preference_dataset", version=version).to_pylist()
    keep = [r for r in rows if r["pair_id"] not in bad_pairs and not bad_labels.intersection(r["label_event_ids"])]
    return TrainingRows(keep, len(rows) - len(keep), "preference_dataset", version)


def rl_prompts(lake: Lake, kinds=("red_team", "helpful"), splits=("train",)) -> TrainingRows:
    """Prompt texts for RL sampling, minus quarantined prompts."""
    bad = {k for t, k in quarantined(lake) if t == "prompts"}
    version = lake.version("prompts")
    rows = [r for r in lake.read("prompts", version=version).to_pylist()
            if r["kind"] in kinds and r["split"] in splits]
    keep = [r for r in rows if r["prompt_id"] not in bad]
    return TrainingRows(keep, len(rows) - len(keep), "prompts", version)
