"""AI feedback labels for sampled pairs: soft labels from log-probs, both orders, K principles.

    cai label --lake lake                         # one principle per pair, both A/B orders
    cai label --ensemble 4                        # 4 principles per pair, averaged
    cai label --cot                               # reason first, then score; p clamped to [0.4, 0.6]
    cai label --feedback-model path/to/model
    cai label --policy cai-sl:2                   # only the pairs that policy sampled
    cai label --lake-engine spark                 # the Spark-native data plane (same labels and dataset)
    spark-submit launch/cai_task.py label --lake lake

Every scoring is a `label_events` row (raw log-probs, p_shown_a, p_a, order, principle,
constitution sha, feedback model, template sha); a CoT is a `generation_events` row. Then
`preference_dataset` is rebuilt: the AI harmlessness pairs (target = mean over principles of
the order-debiased p) plus the human helpfulness pairs listed in params (hard targets).

Exit status: 1 when more than max_failed_fraction of this run's chains of thought (failed, or
given up after max_attempts: `--max-attempts N` retries them) or of its scorings (failed:
quarantined, retried by every rerun) did not succeed; what succeeded is committed. A run that
did nothing because every CoT gave up exits 1 too. `preference_dataset` is never rebuilt smaller
because pairs still selected lack labels (failed scorings or CoTs): the old table is kept and the
run exits 1, unless --allow-shrink. Rows of pairs no longer selected (--limit, --splits,
--policy, human_pairs) may go, with a warning.

`--lake-engine spark`: pairs, plan and pending are Spark DataFrames, the executors score and append
label_events with delta-spark (cai_lib/feedback/spark_labels.py); one run per lake at a time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from cai_lib.backends import Sampling
from cai_lib.backends.models import model_fingerprint
from cai_lib.config import PointerConfig, RegistryConfig, opt, settings_from
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import effective_templates
from cai_lib.feedback.labels import (ANSWER_PREFIX, CHOICES, COT_ANSWER_PREFIX, LabelSettings, conversation_text,
                                     feedback_chat, label_row, plan_labels, shown)
from cai_lib.feedback.pairs import pair_id_of
from cai_lib.feedback.preferences import build_preference_dataset
from cai_lib.ids import derive_seed, sha256_text, stable_id
from cai_lib.lake.queries import known_events, select_prompts
from cai_lib.lake.spark_delta import open_lake
from cai_lib.runtime.scoring import score_on_spark
from cai_lib.runtime.tasks import Task, most_tries, new_job_run_id, retry_plan, run_tasks
from jobs.common import (MAX_NEW_TOKENS, Failures, FeedbackFields, GenerationConfig, guarded_replace, spark_job_main,
                         write_pointer)
from schemas import LABEL_EVENTS


@dataclass
class LabelConfig(GenerationConfig, FeedbackFields, RegistryConfig, PointerConfig):
    MODEL_FIELDS = ("feedback_model", "policy")
    # sampling and the clamp are the chain of thought's: without --cot the labels are read from log-probs only
    FLAG_NEEDS = {k: ("cot", (True,)) for k in ("clamp_lo", "clamp_hi", "cot_max_new_tokens", "temperature", "top_p",
                                               "max_attempts")}
    policy: str | None = opt(None, "label only the pairs this policy sampled (a registered model or folder; "
                                   "default: every sampled pair)")
    cot: bool = opt(False, "chain of thought first, then score; p clamped to [clamp_lo, clamp_hi]")
    clamp_lo: float = opt(0.4, "CoT labels are clamped: reasoning makes the model over-confident", lo=0.0, lt=0.5)
    clamp_hi: float = opt(0.6, "upper CoT clamp", gt=0.5, hi=1.0)
    cot_max_new_tokens: int = opt(96, "token budget of a chain of thought", **MAX_NEW_TOKENS)
    human_pairs: list = opt([], "params only: [{path, limit, seed}] HH-RLHF helpfulness files -> human_helpful rows",
                            flag=False)
    allow_shrink: bool = opt(False, "replace preference_dataset even when pairs lacking labels would make it smaller")

    def settings(self) -> LabelSettings:
        return settings_from(self, LabelSettings)


def sampled_pairs(lake, cfg: LabelConfig, policy_fp: str | None) -> tuple[list[tuple], dict[str, str], dict[str, str]]:
    """(pair_id, prompt_id, a_id, b_id) for prompts with both samples from one policy (`policy_fp`, or
    every policy that sampled pairs when None); texts by event id; prompts by id. Of two samples of one
    round, the latest by (created_at, event_id), as `spark_labels.sampled_pairs` picks."""
    prompts, chosen = select_prompts(lake, cfg.splits, cfg.limit, kinds=("red_team",))
    ev = lake.read("generation_events", columns=["event_id", "kind", "status", "prompt_id", "round",
                                                 "model_fingerprint", "created_at", "text"])
    ev = ev.filter(pc.and_(pc.equal(ev["kind"], "pair_sample"), pc.equal(ev["status"], "ok")))
    if policy_fp is not None:
        ev = ev.filter(pc.equal(ev["model_fingerprint"], policy_fp))
    latest: dict[tuple[str, str], dict[int, tuple]] = {}
    texts = {}
    for r in ev.to_pylist():
        if r["prompt_id"] in chosen:
            rounds = latest.setdefault((r["prompt_id"], r["model_fingerprint"]), {})
            key = (r["created_at"], r["event_id"])
            rounds[r["round"]] = max(rounds.get(r["round"], key), key)
            texts[r["event_id"]] = r["text"]
    pairs = [(pair_id_of(pid, s[0][1], s[1][1]), pid, s[0][1], s[1][1]) for (pid, _), s in sorted(latest.items())
             if {0, 1} <= set(s)]
    if not pairs:
        raise ValueError(f"no sampled pairs in lake {lake.root} for the policy model: run `cai sample-pairs` first")
    return pairs, texts, dict(zip(prompts["prompt_id"].to_pylist(), prompts["text"].to_pylist()))


def lacking_labels(score_fails: Failures, cot_fails: Failures) -> str:
    """Why preference_dataset would lose rows of pairs still selected."""
    return (f"those pairs lack labels under these settings (constitution, feedback model, ensemble, cot): "
            f"{score_fails.failed} scorings failed and {cot_fails.failed + cot_fails.gave_up} chains of thought "
            f"failed or gave up in this run")


def run(spark, cfg: LabelConfig, progress=None) -> dict:
    if cfg.lake_engine == "spark":
        return run_on_spark(spark, cfg, progress)
    lake = open_lake(cfg.lake, spark)
    constitution = load_constitution(cfg.constitution)
    fb_model = cfg.feedback_model
    fb_fp = model_fingerprint(cfg.backend, fb_model)
    pairs, texts, prompt_text = sampled_pairs(lake, cfg, policy_fingerprint(cfg))
    s = cfg.settings()
    cot_sampling = Sampling(cfg.temperature, cfg.top_p, cfg.cot_max_new_tokens)
    jobs = plan_labels(pairs, constitution, fb_fp, s, cot_sampling.to_json())
    have = set(lake.read("label_events", columns=["event_id"])["event_id"].to_pylist())
    pending = [j for j in jobs if j.event_id not in have]
    templates = effective_templates(constitution)
    template = templates["cot" if s.cot else "comparison"]
    constants = lineage(cfg, constitution, fb_fp)
    job_run_id = new_job_run_id()
    chat_of = lambda j: feedback_chat(template, conversation_text(prompt_text[j.prompt_id]),  # noqa: E731
                                      constitution.comparison_principle(j.principle_id).text, *shown(j, texts))
    cot_text, cot_calls, cot_gave_up = {}, 0, 0
    cot_fails = Failures("chains of thought", max_attempts=cfg.max_attempts)
    if s.cot and pending:
        cot_text, failures = known_events(lake, {j.cot_id for j in pending})
        planned = [Task(j.cot_id, "cot", j.prompt_id, None, j.k, j.principle_id, derive_seed(cfg.seed, "cot", j.cot_id),
                        cot_sampling.to_json(), chat_of(j)) for j in pending if j.cot_id not in cot_text]
        todo, cot_gave_up = retry_plan(planned, cot_text, failures, cfg.max_attempts)
        stats = None
        if todo:
            if progress:
                progress(f"chain of thought for {len(todo)} comparisons")
            stats, rows = run_tasks(spark, lake, todo, cfg.backend_spec(fb_model), constants, batch_size=cfg.batch_size,
                                    batches_per_commit=cfg.batches_per_commit, job_run_id=job_run_id)
            cot_calls = stats.model_calls
            cot_text.update({r["target_event_id"]: r["text"] for r in rows.to_pylist() if r["status"] == "ok"})
        cot_fails = Failures.of("chains of thought", stats, cot_gave_up, cfg.max_attempts,
                                most_tries([t.event_id for t in planned], cot_text, failures))
        pending = [j for j in pending if j.cot_id in cot_text]  # a failed CoT is an event; its label waits
    inserted, quarantined, score_calls = 0, 0, 0
    score_fails = Failures("scorings", attempted=len(pending))
    group = cfg.batch_size * cfg.batches_per_commit
    for g in range(0, len(pending), group):
        chunk = pending[g:g + group]
        if progress:
            progress(f"scoring {g + len(chunk)}/{len(pending)} comparisons")
        items = [(chat_of(j), (cot_text[j.cot_id] + COT_ANSWER_PREFIX) if s.cot else ANSWER_PREFIX) for j in chunk]
        scores, calls = score_on_spark(spark, items, cfg.backend_spec(fb_model), CHOICES, batch_size=cfg.batch_size)
        score_calls += calls
        now = datetime.now(timezone.utc)
        rows, bad = [], []
        for j, sc in zip(chunk, scores):
            if sc["error"] is not None:
                score_fails.failed += 1
                score_fails.first_error = score_fails.first_error or sc["error"]
                bad.append({"event_id": stable_id("quarantine", stage="label", label=j.event_id), "stage": "label",
                            "source": "label_events", "source_row": None, "field": "logprobs", "reason": sc["error"],
                            "payload": j.event_id, "job_run_id": job_run_id, "created_at": now, "row_key": None})
                continue
            rows.append(label_row(j, sc["logprob_a"], sc["logprob_b"], s, "ai_label_cot" if s.cot else "ai_label",
                                  constants, job_run_id, now))
        inserted += lake.insert_new("label_events", pa.Table.from_pylist(rows, schema=LABEL_EVENTS)) if rows else 0
        quarantined += lake.insert_new("quarantine", pa.Table.from_pylist(bad)) if bad else 0
    labels = lake.read("label_events")
    mine = {j.event_id for j in jobs}
    labels = labels.filter(pc.is_in(labels["event_id"], pa.array(sorted(mine), pa.string())))
    dataset, left_out = build_preference_dataset(labels, texts, prompt_text, cfg.human_pairs)
    selected = {p[0] for p in pairs} | set(pc.filter(dataset["pair_id"], pc.equal(dataset["source"], "human_helpful"))
                                           .to_pylist())

    changed, errors, warnings = guarded_replace(lake, "preference_dataset", dataset, selected, cfg.allow_shrink,
                                                lambda ids: lacking_labels(score_fails, cot_fails))
    write_pointer(cfg.pointer, lake, ["label_events", "preference_dataset"],
                  {"constitution_sha": constitution.sha256, "feedback_model_fingerprint": fb_fp})
    n_ai = int(pc.sum(pc.equal(dataset["source"], "ai_harmless")).as_py() or 0)
    return {"pairs": len(pairs), "comparisons": len(jobs), "scored": len(pending), "inserted": inserted,
            "quarantined": quarantined, "model_calls": score_calls + cot_calls,
            "failed": score_fails.failed + cot_fails.failed, "cot_failed": cot_fails.failed, "cot_gave_up": cot_gave_up,
            "ai_pairs": n_ai, "human_pairs": dataset.num_rows - n_ai, **left_out,
            "preference_dataset_rewritten": changed,
            "labels_sha": sha256_text(",".join(sorted(mine)))[:12],
            "failures": [cot_fails, score_fails], "errors": errors, "warnings": warnings}


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


def run_on_spark(spark, cfg: LabelConfig, progress=None) -> dict:
    """The same labels and preference_dataset on the Spark-native data plane (cai_lib/feedback/spark_labels.py):
    pairs, plan and pending in Spark, chains of thought a generation wave, the executors score and append."""
    import functools

    from pyspark.sql import functions as F

    from cai_lib.feedback import spark_labels as sl
    from cai_lib.feedback.preferences import human_rows
    from cai_lib.lake.locks import job_lock
    from cai_lib.runtime import spark_plane as plane
    from jobs.common import guarded_replace_df
    lake = open_lake(cfg.lake, spark, engine="spark")
    constitution = load_constitution(cfg.constitution)
    fb_fp = model_fingerprint(cfg.backend, cfg.feedback_model)
    chosen = plane.selected_prompts(lake, cfg.splits, cfg.limit, kinds=("red_team",)).where("chosen")
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
    spec, slots, job_run_id = cfg.backend_spec(cfg.feedback_model), spark.sparkContext.defaultParallelism, new_job_run_id()
    cuts = dict(batch_size=cfg.batch_size, batches_per_commit=cfg.batches_per_commit, slots=slots)
    samples = plane.successful(events.where(F.col("kind") == "pair_sample"))
    cot_fails, cot_gave_up, cot_calls = Failures("chains of thought", max_attempts=cfg.max_attempts), 0, 0
    with job_lock(cfg.lake, "label", job_run_id):
        todo = jobs.join(lake.df("label_events").select("event_id"), "event_id", "left_anti")
        todo = sl.with_texts(todo, chosen, samples).localCheckpoint(eager=True)
        if s.cot and not todo.isEmpty():
            cots = events.where(F.col("kind") == "cot").join(todo.select(F.col("cot_id").alias("target_event_id")),
                                                             "target_event_id", "left_semi")
            cots = cots.select("target_event_id", "status", "text").localCheckpoint(eager=True)
            gen, cot_gave_up, chunks = plane.pending(lake, sl.cot_inputs(todo, cot_sampling), plane.successful(cots),
                                                     plane.failure_counts(cots), table="generation_events",
                                                     plan_id=f"{job_run_id}/cot", max_attempts=cfg.max_attempts, **cuts)
            stats = None
            if chunks:
                if progress:
                    progress(f"chain of thought for {sum(c[2] for c in chunks)} comparisons")
                stats = plane.run_wave(spark, lake, gen, chunks, make_chat=make_chat, backend_spec=spec,
                                       constants=constants, job_run_id=job_run_id, progress=progress)
            cot_calls = stats.model_calls if stats else 0
            cots = lake.df("generation_events").where(F.col("kind") == "cot")
            cot_fails = Failures.of("chains of thought", stats, cot_gave_up, cfg.max_attempts,
                                    plane.most_tries(todo.select(F.col("cot_id").alias("event_id")), cots))
            todo = sl.with_cot(todo, plane.successful(cots))   # a failed CoT is an event; its label waits
        todo, chunks = plane.cut(todo, f"{job_run_id}/labels", **cuts)
        if chunks and progress:
            progress(f"scoring {sum(c[2] for c in chunks)} comparisons in {len(chunks)} commits")
        scoring, quarantined = sl.run_scoring(spark, lake, todo, chunks, spec=spec, make_chat=make_chat, settings=s,
                                              constants=constants, job_run_id=job_run_id, slots=slots,
                                              progress=progress)
        score_fails = Failures.of("scorings", scoring)
        labels = lake.df("label_events").join(jobs.select("event_id"), "event_id", "left_semi")
        human, rejected = human_rows(cfg.human_pairs)
        dataset, incomplete = sl.preference_rows(labels, samples, chosen, sl.human_table(human))
        dataset = dataset.localCheckpoint(eager=True)
        selected = jobs.select("pair_id").unionByName(
            spark.createDataFrame([(r["pair_id"],) for r in human], "pair_id string")).distinct()
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
