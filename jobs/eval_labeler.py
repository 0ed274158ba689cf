"""How good is the AI labeller? Agreement with human labels, calibration, swap consistency, HHH.

    cai eval-labeler --lake lake --human ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --sample-size 200
    cai eval-labeler --hhh ../shared/data/constitutional-harmlessness-paper/evals/438HHHEvaluations.jsonl

HH-RLHF harmlessness pairs are labelled exactly as `cai label` labels sampled pairs (the same
prompt, K principles, both orders); which response is shown as A is a hash of the pair. Each
comparison is a `label_events` row (kind eval_label). HHH items are scored by log-prob of
their correct vs incorrect option. Metrics go to a JSON file (for `dvc metrics`) and the
reliability curve to a PNG.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cai_lib.backends.models import model_fingerprint
from cai_lib.config import opt, settings_from
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import effective_templates
from cai_lib.feedback import label_metrics as lm
from cai_lib.feedback.labels import ANSWER_PREFIX, CHOICES, LabelSettings, feedback_chat, label_row, plan_labels, shown
from cai_lib.feedback.preferences import dialogue_text
from cai_lib.files import write_json
from cai_lib.ids import sha256_text, stable_id
from cai_lib.lake.spark_delta import open_lake
from cai_lib.runtime.scoring import score_on_spark
from cai_lib.runtime.tasks import new_job_run_id
from cai_lib.sources.eval_data import read_hh_pairs, read_hhh
from jobs.common import FeedbackFields, ModelJobConfig, spark_job_main
from schemas import LABEL_EVENTS


@dataclass
class EvalLabelerConfig(ModelJobConfig, FeedbackFields):
    MODEL_FIELDS = ("feedback_model",)
    human: str | None = opt(None, "HH-RLHF harmlessness pairs (jsonl/.gz) with human labels")
    sample_size: int = opt(200, "pairs drawn (seeded) from --human")
    hhh: str | None = opt(None, "the HHH evaluation (438HHHEvaluations.jsonl format)")
    metrics: str = opt("metrics/eval_labeler.json", "metrics JSON written here")
    plot: str = opt("metrics/labeler_reliability.png", "reliability curve PNG written here")


def eval_human_pairs(spark, lake, cfg, constitution, fp, constants, job_run_id) -> dict:
    pairs, rejected = read_hh_pairs(cfg.human, limit=cfg.sample_size, seed=cfg.seed)
    texts, contexts, outcome, plan_pairs = {}, {}, {}, []
    for p in pairs:
        pid = stable_id("human_context", text=dialogue_text(p.context))
        c_id, r_id = stable_id("response", text=p.chosen), stable_id("response", text=p.rejected)
        pair_id = stable_id("eval_pair", source=Path(cfg.human).name, row=p.row, c=c_id, r=r_id)
        a_is_chosen = int(pair_id[:2], 16) % 2 == 0
        a_id, b_id = (c_id, r_id) if a_is_chosen else (r_id, c_id)
        texts.update({c_id: p.chosen, r_id: p.rejected})
        contexts[pid] = dialogue_text(p.context)
        outcome[pair_id] = 1 if a_is_chosen else 0
        plan_pairs.append((pair_id, pid, a_id, b_id))
    s = settings_from(cfg, LabelSettings)   # no CoT: eval-labeler has no cot field, so the default (False)
    jobs = plan_labels(plan_pairs, constitution, fp, s)
    template = effective_templates(constitution)["comparison"]
    stored = lake.read("label_events")
    stored = stored.filter(pc.is_in(stored["event_id"], pa.array([j.event_id for j in jobs], pa.string())))
    have = {r["event_id"]: r for r in stored.to_pylist()}  # only this evaluation's comparisons
    todo = [j for j in jobs if j.event_id not in have]
    items = [(feedback_chat(template, contexts[j.prompt_id], constitution.comparison_principle(j.principle_id).text,
                            *shown(j, texts)), ANSWER_PREFIX) for j in todo]
    scores, calls = score_on_spark(spark, items, cfg.backend_spec(cfg.feedback_model), CHOICES, batch_size=cfg.batch_size)
    now = datetime.now(timezone.utc)
    new = [label_row(j, sc["logprob_a"], sc["logprob_b"], s, "eval_label", constants, job_run_id, now)
           for j, sc in zip(todo, scores) if sc["error"] is None]
    if new:
        lake.insert_new("label_events", pa.Table.from_pylist(new, schema=LABEL_EVENTS))
    rows = {**have, **{r["event_id"]: r for r in new}}
    labels = [rows[j.event_id] for j in jobs if j.event_id in rows]
    by_pair: dict[str, dict] = {}
    for r in labels:
        by_pair.setdefault(r["pair_id"], {}).setdefault(r["ensemble_index"], {})[r["order"]] = r
    probs, outs, consistent, principle_keys, principle_probs, principle_outs = [], [], [], [], [], []
    for pair_id, ks in by_pair.items():
        per_k = [lm.debias(o["ab"]["p_a"], o["ba"]["p_shown_a"]) for o in ks.values() if len(o) == 2]
        if len(per_k) != len(ks):
            continue
        probs.append(sum(per_k) / len(per_k))
        outs.append(outcome[pair_id])
        consistent.append(all(lm.swap_consistent(o["ab"]["p_a"], o["ba"]["p_a"]) for o in ks.values()))
        for o in ks.values():
            principle_keys.append(o["ab"]["principle_id"])
            principle_probs.append(lm.debias(o["ab"]["p_a"], o["ba"]["p_shown_a"]))
            principle_outs.append(outcome[pair_id])
    curve = lm.reliability_curve(probs, outs)
    lm.plot_reliability(curve, cfg.plot, title=f"AI labeller vs human labels (n={len(probs)})")
    return {"human_file": cfg.human, "pairs_rejected_by_reader": len(rejected), "model_calls": calls,
            **{f"human_{k}": v for k, v in lm.summarise(probs, outs).items()},
            "swap_consistency": sum(consistent) / len(consistent),
            "position_bias": lm.position_bias([r["p_shown_a"] for r in labels]),
            "per_principle": lm.per_group(principle_keys, principle_probs, principle_outs),
            "reliability_curve": curve, "reliability_png": cfg.plot}


def eval_hhh(spark, cfg) -> dict:
    items = read_hhh(cfg.hhh)
    chats = []
    for it in items:
        body = it.prompt.rstrip()
        body = body[: -len("The answer is:")].rstrip() if body.endswith("The answer is:") else body
        chats.append(([{"role": "user", "content": body}], ANSWER_PREFIX))
    scores, _ = score_on_spark(spark, chats, cfg.backend_spec(cfg.feedback_model), CHOICES, batch_size=cfg.batch_size)
    right = 0.0
    for it, sc in zip(items, scores):
        lp = {CHOICES[0]: sc["logprob_a"], CHOICES[1]: sc["logprob_b"]}
        diff = lp[it.correct] - lp[it.incorrect]
        right += 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0
    return {"hhh_n": len(items), "hhh_accuracy": right / len(items)}


def run(spark, cfg: EvalLabelerConfig, progress=None) -> dict:
    if not (cfg.human or cfg.hhh):
        raise ValueError("nothing to evaluate: pass --human HH-RLHF-FILE and/or --hhh HHH-FILE")
    lake = open_lake(cfg.lake, spark, mode="create")   # its own comparisons only: a new lake will do
    constitution = load_constitution(cfg.constitution)
    fb_model = cfg.feedback_model
    fp = model_fingerprint(cfg.backend, fb_model)
    constants = {"constitution_id": constitution.id, "constitution_sha": constitution.sha256, "model_id": fb_model,
                 "model_fingerprint": fp, "backend": cfg.backend,
                 "template_sha": settings_from(cfg, LabelSettings).template_sha(constitution)}
    out: dict = {"feedback_model": fb_model, "model_fingerprint": fp, "constitution_sha": constitution.sha256}
    if cfg.human:
        out.update(eval_human_pairs(spark, lake, cfg, constitution, fp, constants, new_job_run_id()))
    if cfg.hhh:
        out.update(eval_hhh(spark, cfg))
    write_json(cfg.metrics, out)
    out["metrics_sha"] = sha256_text(json.dumps(out, sort_keys=True))[:12]
    return out


def main(argv=None) -> int:
    return spark_job_main(EvalLabelerConfig, "eval_labeler", argv, __doc__, run)


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("eval-labeler"))
