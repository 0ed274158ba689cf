"""What jobs read from the lake on the driver: the training prompts no evaluation may use."""
from __future__ import annotations


def training_prompt_texts(lake) -> dict[str, str]:
    """{normalised text: prompt_id} of the lake's train-split prompts (empty if it has none): what
    no evaluation may use (`sources.eval_data.read_disjoint_pairs`, the labels gate's contamination check)."""
    from cai_lib.ids import normalise_text
    if not lake.exists("prompts"):
        return {}
    rows = lake.read("prompts", columns=["prompt_id", "text", "split"]).to_pylist()
    return {normalise_text(r["text"]): r["prompt_id"] for r in rows if r["split"] == "train"}
