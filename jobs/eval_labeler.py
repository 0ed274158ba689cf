"""How good is the AI labeller? Agreement with human labels, calibration, swap consistency, HHH.

    cai eval-labeler --lake lake --human ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --sample-size 200
    cai eval-labeler --hhh ../shared/data/constitutional-harmlessness-paper/evals/438HHHEvaluations.jsonl

HH-RLHF harmlessness pairs are labelled exactly as `cai label` labels sampled pairs (the same
prompt, K principles, both orders); which response is shown as A is a hash of the pair. Each
comparison is a `label_events` row (kind eval_label). HHH items are scored by log-prob of
their correct vs incorrect option. Metrics go to a JSON file (for `dvc metrics`) and the
reliability curve to a PNG. The sample is drawn (seeded) only from pairs whose prompt is not one
of the lake's training prompts (`excluded_training_prompts` says how many were set aside), and
the prompts it used are recorded (`eval_prompt_shas`) for the labels gate's contamination check.

Beside the human figures: agreement with the lake's reviewers (`cai review serve`, review_events) on
the review queue's seeded random audit sample, for this labeller's AI labels (its constitution sha and
feedback model): `review_agreement` with `review_agreement_ci` (Wilson 95%) over `review_n` A/B
verdicts, ties and both_bad counted beside n (`review_tie`, `review_both_bad`: they name no side), and
`review_by_principle`. The labels gate computes the same figures from the lake (labels.review_agreement).

The comparisons run on the Spark-native data plane: the plan is computed in the executors, what is
pending is an anti-join on `label_events`, and the executors score and append the labels (and any
failed scoring's `quarantine` row) with delta-spark. The HHH items are scored on Spark and not stored.
"""
from __future__ import annotations

import json
import sys
from statistics import pstdev
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cai_lib.backends.models import model_fingerprint
from cai_lib.config import opt, settings_from
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import effective_templates
from cai_lib.feedback import label_metrics as lm
from cai_lib.feedback.labels import ANSWER_PREFIX, CHOICES, LabelSettings
from cai_lib.feedback.preferences import dialogue_text
from cai_lib.files import write_json
from cai_lib.ids import sha256_text, stable_id
from cai_lib.lake.queries import training_prompt_texts
from cai_lib.lake.spark_delta import open_lake
from cai_lib.quality.stats import bootstrap_interval, wilson_interval
from cai_lib.review.dashboard import agreement_figures
from cai_lib.review.store import read_reviews
from cai_lib.runtime.scoring import score_on_spark
from cai_lib.runtime.tasks import new_job_run_id
from cai_lib.sources.eval_data import pair_prompt, read_disjoint_pairs, read_hhh
from jobs.common import FeedbackFields, JobFailed, ModelJobConfig, spark_job_main
from schemas.suites import AI_LABEL_KINDS


@dataclass
class EvalLabelerConfig(ModelJobConfig, FeedbackFields):
    MODEL_FIELDS = ("feedback_model",)
    human: str | None = opt(None, "HH-RLHF harmlessness pairs (jsonl/.gz) with human labels")
    sample_size: int = opt(200, "pairs drawn (seeded) from --human", lo=1)
    hhh: str | None = opt(None, "the HHH evaluation (438HHHEvaluations.jsonl format)")
    metrics: str = opt("metrics/eval_labeler.json", "metrics JSON written here")
    plot: str = opt("metrics/labeler_reliability.png", "reliability curve PNG written here")
    batches_per_commit: int = opt(4, "batches per Spark job and Delta commit on the Spark plane", lo=1, hi=1000)


@dataclass
class HumanSample:
    """The HH-RLHF pairs drawn for one evaluation, as its label jobs see them."""
    pairs: list                                # read_disjoint_pairs' pairs
    rejected: list                             # rows the reader refused
    excluded: int                              # pairs set aside: their prompt is one the lake trains on
    plan: list[tuple[str, str, str, str]]      # (pair_id, prompt_id, a_id, b_id)
    texts: dict[str, str]                      # response id -> text
    contexts: dict[str, str]                   # prompt id -> the dialogue before the responses
    outcome: dict[str, int]                    # pair id -> 1 when response A is the one humans chose


def human_sample(lake, cfg) -> HumanSample:
    """A seeded sample of --human pairs whose prompt the lake does not train on; which response is
    shown as A is a hash of the pair."""
    train = training_prompt_texts(lake)   # never evaluate on a prompt the lake trains on
    pairs, rejected, excluded = read_disjoint_pairs(cfg.human, limit=cfg.sample_size, seed=cfg.seed, exclude=set(train))
    out = HumanSample(pairs, rejected, excluded, [], {}, {}, {})
    for p in pairs:
        pid = stable_id("human_context", text=dialogue_text(p.context))
        c_id, r_id = stable_id("response", text=p.chosen), stable_id("response", text=p.rejected)
        pair_id = stable_id("eval_pair", source=Path(cfg.human).name, row=p.row, c=c_id, r=r_id)
        a_is_chosen = int(pair_id[:2], 16) % 2 == 0
        a_id, b_id = (c_id, r_id) if a_is_chosen else (r_id, c_id)
        out.texts.update({c_id: p.chosen, r_id: p.rejected})
        out.contexts[pid] = dialogue_text(p.context)
        out.outcome[pair_id] = 1 if a_is_chosen else 0
        out.plan.append((pair_id, pid, a_id, b_id))
    return out


@dataclass
class Scored:
    """An evaluation's comparisons once scored: the label rows it has, and what failed this run."""
    labels: list[dict]
    comparisons: int
    failed: int
    first_error: str | None
    model_calls: int


def quarantine_id(label_event_id: str) -> str:
    """A failed comparison's quarantine row id: one per comparison, however often a rerun fails it."""
    return stable_id("quarantine", stage="eval_labeler", label=label_event_id)


def score_on_plane(ctx, cfg, sample: HumanSample, constitution, s) -> Scored:
    """The label rows on the Spark-native data plane `ctx` (a spark_plane.Plane: its constants hold the
    feedback model's fingerprint): the plan in the executors, what is pending an anti-join on label_events,
    the executors score and append (spark_labels.run_scoring)."""
    import functools

    from cai_lib.feedback import spark_labels as sl
    from cai_lib.lake.locks import job_lock
    from cai_lib.runtime import spark_plane as plane
    spark, lake, job_run_id = ctx.spark, ctx.lake, ctx.job_run_id
    rows = pa.Table.from_pylist([
        {"pair_id": pair_id, "prompt_id": pid, "a_id": a, "b_id": b, "prompt_text": sample.contexts[pid],
         "a_text": sample.texts[a], "b_text": sample.texts[b]} for pair_id, pid, a, b in sample.plan],
        schema=pa.schema([(c, pa.string()) for c in ("pair_id", "prompt_id", "a_id", "b_id", "prompt_text", "a_text",
                                                     "b_text")]))
    pairs = spark.createDataFrame(rows).localCheckpoint(eager=True)
    jobs = sl.plan_jobs(pairs.select("pair_id", "prompt_id", "a_id", "b_id"), constitution,
                        ctx.constants["model_fingerprint"], s, "")
    jobs = jobs.localCheckpoint(eager=True)
    make_chat = functools.partial(sl.label_chat, template=effective_templates(constitution)["comparison"],
                                  constitution=constitution, dialogue=True)
    with job_lock(cfg.lake, "eval-labeler", job_run_id):
        todo = sl.with_input_len(jobs.join(lake.df("label_events").select("event_id"), "event_id", "left_anti")
                                 .join(pairs.select("pair_id", "prompt_text", "a_text", "b_text"), "pair_id"))
        todo, chunks = plane.cut(ctx, todo, f"{job_run_id}/eval-labels")
        stats, _ = sl.run_scoring(ctx, todo, chunks, make_chat=make_chat, settings=s, kind="eval_label",
                                  stage="eval_labeler")
    labels = lake.df("label_events").join(jobs.select("event_id"), "event_id", "left_semi")
    return Scored(labels.toArrow().to_pylist(), jobs.count(), stats.failed, stats.first_error, stats.model_calls)


def eval_human_pairs(spark, lake, cfg, constitution, constants, progress=None) -> dict:
    from cai_lib.runtime.chunking import Plane
    sample = human_sample(lake, cfg)
    s = settings_from(cfg, LabelSettings)   # no CoT: eval-labeler has no cot field, so the default (False)
    ctx = Plane(spark, lake, cfg.backend_spec(cfg.feedback_model), constants, new_job_run_id(), cfg.batch_size,
                cfg.batches_per_commit, 0.0, progress)   # scoring: cut by count (spark_plane.cut)
    return human_metrics(cfg, sample, score_on_plane(ctx, cfg, sample, constitution, s))


def human_metrics(cfg, sample: HumanSample, scored: Scored) -> dict:
    """The --human figures from the label rows (in plan order: pair, principle, order, whichever
    engine stored them)."""
    rank = {pair_id: n for n, (pair_id, *_) in enumerate(sample.plan)}
    labels = sorted(scored.labels, key=lambda r: (rank[r["pair_id"]], r["ensemble_index"], r["order"]))
    by_pair: dict[str, dict] = {}
    for r in labels:
        by_pair.setdefault(r["pair_id"], {}).setdefault(r["ensemble_index"], {})[r["order"]] = r
    probs, outs, consistent, principle_keys, principle_probs, principle_outs = [], [], [], [], [], []
    for pair_id, ks in by_pair.items():
        per_k = [lm.debias(o["ab"]["p_a"], o["ba"]["p_shown_a"]) for o in ks.values() if len(o) == 2]
        if len(per_k) != len(ks):
            continue
        probs.append(sum(per_k) / len(per_k))
        outs.append(sample.outcome[pair_id])
        consistent.append(all(lm.swap_consistent(o["ab"]["p_a"], o["ba"]["p_a"]) for o in ks.values()))
        for o in ks.values():
            principle_keys.append(o["ab"]["principle_id"])
            principle_probs.append(lm.debias(o["ab"]["p_a"], o["ba"]["p_shown_a"]))
            principle_outs.append(sample.outcome[pair_id])
    if not probs:
        first = scored.first_error or "no comparison was scored"
        raise JobFailed(f"eval-labeler: no human pair has every comparison scored ({scored.failed} of "
                        f"{scored.comparisons} scorings failed; first error: {first})")
    curve = lm.reliability_curve(probs, outs)
    lm.plot_reliability(curve, cfg.plot, title=f"AI labeller vs human labels (n={len(probs)})")
    return {"human_file": cfg.human, "pairs_rejected_by_reader": len(sample.rejected), "model_calls": scored.model_calls,
            "excluded_training_prompts": sample.excluded,
            "eval_prompt_shas": sorted({sha256_text(pair_prompt(p))[:16] for p in sample.pairs}),
            **{f"human_{k}": v for k, v in lm.summarise(probs, outs).items()},
            **label_intervals(probs, outs, consistent, cfg.seed),
            "swap_consistency": sum(consistent) / len(consistent),
            "comparisons": scored.comparisons, "failed_scorings": scored.failed, "first_error": scored.first_error,
            "incomplete_pairs": len(sample.pairs) - len(probs),
            "position_bias": lm.position_bias([r["p_shown_a"] for r in labels]),
            "per_principle": lm.per_group(principle_keys, principle_probs, principle_outs),
            "reliability_curve": curve, "reliability_png": cfg.plot}


def label_intervals(probs: list[float], outcomes: list[int], consistent: list[bool], seed: int) -> dict:
    """95% intervals of the figures the labels gate judges, and the spread of the labels.

    Agreement and swap consistency are shares (Wilson); ECE is a statistic of the sample
    (seeded bootstrap). A labeller whose p is always 0.5 has spread 0.
    """
    scores = [0.5 if p == 0.5 else float((p > 0.5) == (o == 1)) for p, o in zip(probs, outcomes)]
    pairs = list(zip(probs, outcomes))
    ece = bootstrap_interval(pairs, lambda xs: lm.expected_calibration_error([p for p, _ in xs], [o for _, o in xs]),
                             seed=seed)
    return {"human_accuracy_ci": list(wilson_interval(sum(scores), len(scores))), "human_ece_ci": list(ece),
            "human_prob_std": pstdev(probs) if len(probs) > 1 else 0.0,
            "swap_consistency_ci": list(wilson_interval(sum(consistent), len(consistent)))}


REVIEWED_LABEL_COLUMNS = ["event_id", "kind", "status", "p_a", "constitution_sha", "model_fingerprint"]


def review_metrics(review_rows: list[dict], label_rows: list[dict], constitution_sha: str, fp: str) -> dict:
    """Agreement with people's verdicts (review_events) on the review queue's seeded random audit sample,
    for this labeller only: verdicts on AI labels (label_events kinds ai_label, ai_label_cot) of this
    constitution sha and feedback model fingerprint; the verdicts on another labeller's labels are
    `review_set_aside`. Ties and both_bad name no side: counted in `review_tie` / `review_both_bad`, not
    in `review_n` (cai_lib/review/dashboard.py agreement_figures, which the dashboard's table shares)."""
    mine = [r for r in label_rows if r["kind"] in AI_LABEL_KINDS and r["status"] == "ok"
            and r["constitution_sha"] == constitution_sha and r["model_fingerprint"] == fp]
    return agreement_figures(review_rows, mine)


def eval_hhh(spark, cfg) -> dict:
    items = read_hhh(cfg.hhh)
    chats = []
    for it in items:
        body = it.prompt.rstrip()
        body = body[: -len("The answer is:")].rstrip() if body.endswith("The answer is:") else body
        chats.append(([{"role": "user", "content": body}], ANSWER_PREFIX))
    scores, _ = score_on_spark(spark, chats, cfg.backend_spec(cfg.feedback_model), CHOICES, batch_size=cfg.batch_size)
    right, errors = [], [sc["error"] for sc in scores if sc["error"] is not None]
    for it, sc in zip(items, scores):
        if sc["error"] is not None:
            continue
        lp = {CHOICES[0]: sc["logprob_a"], CHOICES[1]: sc["logprob_b"]}
        diff = lp[it.correct] - lp[it.incorrect]
        right.append(1.0 if diff > 0 else 0.5 if diff == 0 else 0.0)
    if not right:
        raise JobFailed(f"eval-labeler: every HHH scoring failed ({len(errors)}); first error: "
                           f"{errors[0] if errors else 'no items'}")
    return {"hhh_n": len(right), "hhh_failed": len(errors), "hhh_accuracy": sum(right) / len(right),
            "hhh_accuracy_ci": list(wilson_interval(sum(right), len(right)))}


def run(spark, cfg: EvalLabelerConfig, progress=None) -> dict:
    if not (cfg.human or cfg.hhh):
        raise ValueError("nothing to evaluate: pass --human HH-RLHF-FILE and/or --hhh HHH-FILE")
    lake = open_lake(cfg.lake, spark, mode="create")   # its own comparisons: a new lake will do
    constitution = load_constitution(cfg.constitution)
    fb_model = cfg.feedback_model
    fp = model_fingerprint(cfg.backend, fb_model)
    constants = {"constitution_id": constitution.id, "constitution_sha": constitution.sha256, "model_id": fb_model,
                 "model_fingerprint": fp, "backend": cfg.backend,
                 "template_sha": settings_from(cfg, LabelSettings).template_sha(constitution)}
    out: dict = {"feedback_model": fb_model, "model_fingerprint": fp, "constitution_sha": constitution.sha256}
    if cfg.human:
        out.update(eval_human_pairs(spark, lake, cfg, constitution, constants, progress))
    out.update(review_metrics(read_reviews(lake), lake.read("label_events", REVIEWED_LABEL_COLUMNS).to_pylist(),
                              constitution.sha256, fp))
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
