"""AI feedback labels for sampled pairs: soft labels from log-probs, both orders, K principles.

    cai label --lake lake                         # one principle per pair, both A/B orders
    cai label --ensemble 4                        # 4 principles per pair, averaged
    cai label --cot                               # reason first, then score; p clamped to [0.4, 0.6]
    cai label --feedback-model path/to/model
    cai label --policy cai-sl:2                   # only the pairs that policy sampled
    spark-submit launch/cai_task.py label --lake lake

Every scoring is a `label_events` row (raw log-probs, p_shown_a, p_a, order, principle,
constitution sha, feedback model, template sha); a CoT is a `generation_events` row. Then
`preference_dataset` is rebuilt: the AI harmlessness pairs (target = mean over principles of
the order-debiased p) plus the human helpfulness pairs listed in params (hard targets). With
`--reviewed-verdicts prefer` (params [label] reviewed_verdicts), the pairs people judged in `cai review`
take their verdicts instead (A 1.0, B 0.0, tie 0.5, several reviewers averaged, both_bad dropped, counts
printed) and the row's `origin` names the review_events; the default, ignore, uses the AI labels alone.

Exit status: 1 when more than max_failed_fraction of this run's chains of thought (failed, or
given up after max_attempts: `--max-attempts N` retries them) or of its scorings (failed:
quarantined, retried by every rerun) did not succeed; what succeeded is committed. A run that
did nothing because every CoT gave up exits 1 too. `preference_dataset` is never rebuilt smaller
because pairs still selected lack labels (failed scorings or CoTs): the old table is kept and the
run exits 1, unless --allow-shrink. Rows of pairs no longer selected (--limit, --splits,
--policy, human_pairs) may go, with a warning.

Pairs, plan and pending are Spark DataFrames; the executors score and append label_events with
delta-spark (cai_lib/feedback/spark_labels.py); one run per lake at a time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.backends import Sampling
from cai_lib.backends.models import model_fingerprint
from cai_lib.config import PointerConfig, RegistryConfig, opt, settings_from
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import effective_templates
from cai_lib.feedback.labels import LabelSettings
from cai_lib.feedback.preferences import REVIEWED_VERDICTS, reviewed_targets
from cai_lib.lake.spark_delta import open_lake
from cai_lib.review.store import read_reviews
from cai_lib.runtime.tasks import new_job_run_id
from jobs.common import (MAX_NEW_TOKENS, Failures, FeedbackFields, GenerationConfig, guarded_replace_df, spark_job_main,
                         write_pointer)


@dataclass
class LabelConfig(GenerationConfig, FeedbackFields, RegistryConfig, PointerConfig):
    MODEL_FIELDS = ("feedback_model", "policy")
    # sampling and the clamp are the chain of thought's: without --cot the labels are read from log-probs only
    FLAG_NEEDS = {k: ("cot", (True,)) for k in ("clamp_lo", "clamp_hi", "cot_max_new_tokens", "temperature", "top_p",
                                               "max_attempts", "chunk_seconds")}   # scoring is cut by count
    policy: str | None = opt(None, "label only the pairs this policy sampled (a registered model or folder; "
                                   "default: every sampled pair)")
    # scorings are cut by this count, not by time (a measured size would let two runs cut them differently)
    batches_per_commit: int = opt(64, "batches of scorings (and the most of chains of thought) in one Spark job and "
                                      "Delta commit: bounds what a kill loses", lo=1, hi=1000)
    cot: bool = opt(False, "chain of thought first, then score; p clamped to [clamp_lo, clamp_hi]")
    clamp_lo: float = opt(0.4, "CoT labels are clamped: reasoning makes the model over-confident", lo=0.0, lt=0.5)
    clamp_hi: float = opt(0.6, "upper CoT clamp", gt=0.5, hi=1.0)
    cot_max_new_tokens: int = opt(96, "token budget of a chain of thought", **MAX_NEW_TOKENS)
    human_pairs: list = opt([], "params only: [{path, limit, seed}] HH-RLHF helpfulness files -> human_helpful rows",
                            flag=False)
    allow_shrink: bool = opt(False, "replace preference_dataset even when pairs lacking labels would make it smaller")
    reviewed_verdicts: str = opt("ignore", "prefer: reviewers' verdicts (cai review, review_events) replace the AI "
                                           "target of the pairs they judged (A 1.0, B 0.0, tie 0.5, reviewers "
                                           "averaged; both_bad drops the pair); ignore: the AI labels alone",
                                 choices=REVIEWED_VERDICTS)

    def settings(self) -> LabelSettings:
        return settings_from(self, LabelSettings)


def lacking_labels(score_fails: Failures, cot_fails: Failures) -> str:
    """Why preference_dataset would lose rows of pairs still selected."""
    return (f"those pairs lack labels under these settings (constitution, feedback model, ensemble, cot): "
            f"{score_fails.failed} scorings failed and {cot_fails.failed + cot_fails.gave_up} chains of thought "
            f"failed or gave up in this run")


def lineage(cfg: LabelConfig, constitution, fb_fp: str) -> dict:
    """The lineage columns every label (and chain of thought) of this run carries."""
    return {"constitution_id": constitution.id, "constitution_sha": constitution.sha256,
            "model_id": cfg.feedback_model, "model_fingerprint": fb_fp, "backend": cfg.backend,
            "template_sha": cfg.settings().template_sha(constitution)}


def policy_fingerprint(cfg: LabelConfig) -> str | None:
    """The fingerprint of --policy (whose pairs to label), or None: every policy's pairs."""
    if not cfg.policy:
        return None
    from cai_lib.registry.models import backend_model
    return model_fingerprint(cfg.backend, backend_model(cfg, cfg.policy)[1])


def cot_wave(plane, todo, cot_sampling: str, make_chat, max_attempts: int):
    """The chains of thought of the comparisons `todo` still needs, as one generation wave; `todo` with each
    successful chain joined (a failed one is an event; its label waits), its Failures, gave-up and call counts."""
    from pyspark.sql import functions as F

    from cai_lib.feedback import spark_labels as sl
    from cai_lib.runtime import spark_plane as plane_mod
    events = plane.lake.df("generation_events")
    cots = events.where(F.col("kind") == "cot").join(todo.select(F.col("cot_id").alias("target_event_id")),
                                                     "target_event_id", "left_semi")
    cots = cots.select("target_event_id", "status", "text").localCheckpoint(eager=True)
    gen = plane_mod.pending(plane, sl.cot_inputs(todo, cot_sampling), plane_mod.successful(cots),
                            plane_mod.failure_counts(cots), table="generation_events",
                            plan_id=f"{plane.job_run_id}/cot", max_attempts=max_attempts)
    stats = None
    if gen.rows:
        plane.say(f"chain of thought for {gen.rows} comparisons in {gen.describe()}")
        stats = plane_mod.run_wave(plane, gen, make_chat)
    cots = plane.lake.df("generation_events").where(F.col("kind") == "cot")
    fails = Failures.of("chains of thought", stats, gen.gave_up, max_attempts,
                        plane_mod.most_tries(todo.select(F.col("cot_id").alias("event_id")), cots, gen.gave_up))
    return (sl.with_cot(todo, plane_mod.successful(cots)), fails, gen.gave_up,
            stats.model_calls if stats else 0)


def preference_table(lake, jobs, samples, chosen, human_pairs: list, reviewed: str = "ignore"):
    """preference_dataset's rows (this run's comparisons' labels and the human pairs; with reviewed 'prefer',
    reviewers' verdicts over the AI targets), the pair ids it covers (less the pairs reviewers dropped), the
    human rows, how many human rows were rejected, and how many AI pairs are incomplete."""
    from cai_lib.feedback import spark_labels as sl
    from cai_lib.feedback.preferences import human_rows
    labels = lake.df("label_events").join(jobs.select("event_id"), "event_id", "left_semi")
    human, rejected = human_rows(human_pairs)
    dataset, incomplete = sl.preference_rows(labels, samples, chosen, sl.human_table(human))
    selected = jobs.select("pair_id").unionByName(
        lake.spark.createDataFrame([(r["pair_id"],) for r in human], "pair_id string")).distinct()
    if reviewed == "prefer":
        dataset, selected = with_reviews(dataset, selected, *reviewed_targets(read_reviews(lake)))
    return dataset.localCheckpoint(eager=True), selected, human, rejected, incomplete


def with_reviews(dataset, selected, targets: dict, dropped: dict):
    """The AI rows (source ai_harmless) of the reviewed pairs take the reviewers' target and origin
    (`reviewed_targets`), those of the dropped pairs go (from `selected` too: not a shrink to refuse);
    both counts are printed. Human rows are never touched."""
    from pyspark.sql import functions as F
    spark = dataset.sparkSession
    rows = [(p, t, o, False) for p, (t, o) in targets.items()] + [(p, None, o, True) for p, o in dropped.items()]
    verdicts = spark.createDataFrame(rows, "pair_id string, r_target double, r_origin string, r_drop boolean")
    ai = F.col("source") == "ai_harmless"
    joined = dataset.join(F.broadcast(verdicts), "pair_id", "left").persist()
    reviewed = ai & F.col("r_target").isNotNull()
    gone = ai & F.coalesce(F.col("r_drop"), F.lit(False))
    n_reviewed, n_dropped = joined.where(reviewed).count(), joined.where(gone).count()
    print(f"preference_dataset: {n_reviewed} AI pairs take reviewers' verdicts as targets (origin review_events:...); "
          f"{n_dropped} dropped from training because a reviewer called both responses bad")
    out = (joined.where(~gone).withColumn("target", F.when(reviewed, F.col("r_target")).otherwise(F.col("target")))
           .withColumn("origin", F.when(reviewed, F.col("r_origin")).otherwise(F.col("origin"))))
    drop_ids = spark.createDataFrame([(p,) for p in dropped], "pair_id string")
    return out.select(*dataset.columns), selected.join(drop_ids, "pair_id", "left_anti")


def run(spark, cfg: LabelConfig, progress=None) -> dict:
    """Labels and preference_dataset on the Spark-native data plane (cai_lib/feedback/spark_labels.py):
    pairs, plan and pending in Spark, chains of thought a generation wave, the executors score and append."""
    import functools

    from pyspark.sql import functions as F

    from cai_lib.feedback import spark_labels as sl
    from cai_lib.lake.locks import job_lock
    from cai_lib.runtime import spark_plane as plane_mod
    lake = open_lake(cfg.lake, spark)
    constitution = load_constitution(cfg.constitution)
    fb_fp = model_fingerprint(cfg.backend, cfg.feedback_model)
    chosen = plane_mod.selected_prompts(lake, cfg.splits, cfg.limit, kinds=("red_team",)).where("chosen")
    events = lake.df("generation_events")
    pairs = sl.sampled_pairs(events, chosen, policy_fingerprint(cfg)).localCheckpoint(eager=True)
    n_pairs = pairs.count()
    if not n_pairs:
        raise ValueError(f"no sampled pairs in lake {lake.root} for the policy model: run `cai sample-pairs` first")
    s = cfg.settings()
    cot_sampling = Sampling(cfg.temperature, cfg.top_p, cfg.cot_max_new_tokens).to_json()
    jobs = sl.plan_jobs(pairs, constitution, fb_fp, s, cot_sampling).localCheckpoint(eager=True)
    template = effective_templates(constitution)["cot" if s.cot else "comparison"]
    constants = lineage(cfg, constitution, fb_fp)
    make_chat = functools.partial(sl.label_chat, template=template, constitution=constitution)
    job_run_id = new_job_run_id()
    samples = plane_mod.successful(events.where(F.col("kind") == "pair_sample"))
    cot_fails, cot_gave_up, cot_calls = Failures("chains of thought", max_attempts=cfg.max_attempts), 0, 0
    with job_lock(cfg.lake, "label", job_run_id) as lock:
        plane = plane_mod.Plane(spark, lake, cfg.backend_spec(cfg.feedback_model), constants, job_run_id,
                                cfg.batch_size, cfg.batches_per_commit, cfg.chunk_seconds, progress,
                                exclusive=lock is not None)
        todo = jobs.join(lake.df("label_events").select("event_id"), "event_id", "left_anti")
        todo = sl.with_texts(todo, chosen, samples).localCheckpoint(eager=True)
        if s.cot and not todo.isEmpty():
            todo, cot_fails, cot_gave_up, cot_calls = cot_wave(plane, todo, cot_sampling, make_chat, cfg.max_attempts)
        todo, chunks = plane_mod.cut(plane, todo, f"{job_run_id}/labels")
        if chunks:
            plane.say(f"scoring {sum(c.rows for c in chunks)} comparisons in {len(chunks)} commits")
        scoring, quarantined = sl.run_scoring(plane, todo, chunks, make_chat=make_chat, settings=s)
        score_fails = Failures.of("scorings", scoring)
        dataset, selected, human, rejected, incomplete = preference_table(lake, jobs, samples, chosen, cfg.human_pairs,
                                                                          cfg.reviewed_verdicts)
        changed, errors, warnings = guarded_replace_df(lake, "preference_dataset", dataset, selected,
                                                       cfg.allow_shrink, lambda ids: lacking_labels(score_fails, cot_fails))
        mine_sha = sl.labels_sha(jobs)
        n_jobs = jobs.count()
    write_pointer(cfg.pointer, lake, ["label_events", "preference_dataset"],
                  {"constitution_sha": constitution.sha256, "feedback_model_fingerprint": fb_fp})
    n_ai = dataset.where(F.col("source") == "ai_harmless").count()
    return {"pairs": n_pairs, "comparisons": n_jobs, "scored": score_fails.attempted,
            "inserted": scoring.inserted, "quarantined": quarantined,
            "model_calls": scoring.model_calls + cot_calls, "failed": score_fails.failed + cot_fails.failed,
            "cot_failed": cot_fails.failed, "cot_gave_up": cot_gave_up, "ai_pairs": n_ai,
            "human_pairs": len(human), "incomplete_pairs": incomplete, "human_rows_rejected": rejected,
            "preference_dataset_rewritten": changed, "labels_sha": mine_sha,
            "failures": [cot_fails, score_fails], "errors": errors, "warnings": warnings}


def main(argv=None) -> int:
    return spark_job_main(LabelConfig, "label", argv, __doc__, run)


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("label"))
