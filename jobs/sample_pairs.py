"""Sample two responses per red-team prompt from the policy under study (RLAIF's pairs).

    cai sample-pairs --lake lake --policy default --limit 20
    cai sample-pairs --policy cai-sl                   # the registered SL-CAI model (latest; or cai-sl:3)
    spark-submit launch/cai_task.py sample-pairs --lake lake

Rows land in `generation_events` (kind pair_sample, `round` = sample index) with deterministic
ids: a rerun or a resumed job samples only what is missing. Pairs are data: a prompt that
already has a complete pair (from an earlier policy version) is not sampled again unless
`--resample`, so a retrained SL-CAI model only samples for new prompts.

Exit status: 1 when more than max_failed_fraction of this run's responses failed or were
skipped as given up (after max_attempts failures; `--max-attempts N` retries them), including
a run that did nothing because all its work gave up. Successful samples are committed anyway.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.backends import Sampling
from cai_lib.backends.models import model_fingerprint
from cai_lib.config import PointerConfig, RegistryConfig, opt
from cai_lib.constitution.load import load_constitution
from cai_lib.feedback.pairs import PAIR_TEMPLATE_SHA
from cai_lib.lake.spark_delta import open_lake
from cai_lib.runtime.tasks import new_job_run_id
from jobs.common import MAX_NEW_TOKENS, TEMPERATURE, Failures, GenerationConfig, spark_job_main, write_pointer


@dataclass
class SamplePairsConfig(GenerationConfig, RegistryConfig, PointerConfig):
    MODEL_FIELDS = ("policy",)
    policy: str = opt("cai-sl", "the policy under study: a registered model (cai-sl = latest), a folder or 'default'")
    n_samples: int = opt(2, "responses per prompt (2 = one pair; at most 16)", lo=2, hi=16)
    max_new_tokens: int = opt(96, "token budget of each response", **MAX_NEW_TOKENS)
    temperature: float = opt(1.0, "sampling temperature: diverse pairs make informative comparisons", **TEMPERATURE)
    constitution: str = opt("constitutions/default.yaml", "recorded on the rows for lineage (not in the ids)")
    resample: bool = opt(False, "sample prompts that already have a pair (from an earlier policy) again")


def pair_rounds(lake) -> dict[str, set[int]]:
    """prompt_id -> sample indexes with an ok pair_sample from any policy."""
    import pyarrow.compute as pc
    ev = lake.read("generation_events", columns=["kind", "status", "prompt_id", "round"])
    ev = ev.filter(pc.and_(pc.equal(ev["kind"], "pair_sample"), pc.equal(ev["status"], "ok")))
    out: dict[str, set[int]] = {}
    for pid, rnd in zip(ev["prompt_id"].to_pylist(), ev["round"].to_pylist()):
        out.setdefault(pid, set()).add(rnd)
    return out


def lineage(cfg: SamplePairsConfig, constitution, model_label: str, fp: str) -> dict:
    """The lineage columns every sample of this run carries."""
    return {"constitution_id": constitution.id, "constitution_sha": constitution.sha256, "model_id": model_label,
            "model_fingerprint": fp, "backend": cfg.backend, "template_sha": PAIR_TEMPLATE_SHA}


def run(spark, cfg: SamplePairsConfig, progress=None) -> dict:
    """Pair samples on the Spark-native data plane (cai_lib/runtime/spark_plane.py): planned in the
    executors, pending by anti-join, generated and appended by the executors with delta-spark."""
    import functools

    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from cai_lib.feedback.pairs import SAMPLE_SCHEMA, sample_chat, sample_partition
    from cai_lib.lake.locks import job_lock
    from cai_lib.runtime import spark_plane as plane
    from cai_lib.registry.models import backend_model
    lake = open_lake(cfg.lake, spark)
    constitution = load_constitution(cfg.constitution)
    model_label, load_as = backend_model(cfg, cfg.policy)
    fp = model_fingerprint(cfg.backend, load_as)
    prompts = plane.selected_prompts(lake, cfg.splits, cfg.limit, kinds=("red_team",)).where("chosen")
    n_prompts = prompts.count()
    plan = functools.partial(sample_partition, fingerprint=fp, sampling=Sampling(cfg.temperature, cfg.top_p,
                             cfg.max_new_tokens), seed=cfg.seed, n_samples=cfg.n_samples)
    events = lake.df("generation_events").where(F.col("kind") == "pair_sample")
    if not cfg.resample:  # pairs are data: a prompt that has a complete pair (from any policy) keeps it
        paired = (events.where(F.col("status") == "ok").groupBy("prompt_id")
                  .agg(F.countDistinct("round").alias("n")).where(F.col("n") >= cfg.n_samples))
        prompts = prompts.join(paired.select("prompt_id"), "prompt_id", "left_anti")
    planned = prompts.select("prompt_id", "text").mapInArrow(plan, from_arrow_schema(SAMPLE_SCHEMA))
    planned = planned.localCheckpoint(eager=True)   # not re-planned after each append (see spark_plane.pending)
    constants = lineage(cfg, constitution, model_label, fp)
    job_run_id = new_job_run_id()
    with job_lock(cfg.lake, "sample-pairs", job_run_id) as lock:
        ctx = plane.Plane(spark, lake, cfg.backend_spec(load_as), constants, job_run_id, cfg.batch_size,
                          cfg.batches_per_commit, cfg.chunk_seconds, progress, exclusive=lock is not None)
        stats, gave_up, tries = plane.run_step(ctx, planned, kind="pair_sample", plan_id=f"{job_run_id}/pairs",
                                               make_chat=sample_chat, max_attempts=cfg.max_attempts, what="pair samples")
    write_pointer(cfg.pointer, lake, ["generation_events"], {"model_fingerprint": fp})
    fails = Failures.of("responses", stats, gave_up, cfg.max_attempts, tries)
    return {"prompts": n_prompts, "samples": stats.tasks, "model_calls": stats.model_calls, "ok": stats.ok,
            "failed": stats.failed, "gave_up": gave_up, "inserted": stats.inserted, "failures": [fails]}


def main(argv=None) -> int:
    return spark_job_main(SamplePairsConfig, "sample_pairs", argv, __doc__, run)


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("sample-pairs"))
