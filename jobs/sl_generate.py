"""SL-CAI generation: first answers, then R rounds of critique -> revision, on Spark.

    cai sl-generate --lake lake --rounds 4 --limit 10
    cai sl-generate --constitution constitutions/medical_information.yaml --base-model path/to/model
    spark-submit launch/cai_task.py sl-generate --lake lake --rounds 1

Each round is one wave batched across all prompts: Spark spreads the batches over Python
workers (one loaded model each). Every generation is a `generation_events` row with a
deterministic id; a rerun, a retried task or a resumed job calls the model only for ids not
yet present. `sl_dataset` (final revisions + helpful answers) is rebuilt from the events.

Exit status: 1 when more than max_failed_fraction of this run's generations failed or were
skipped as given up (a run that did nothing because all its work gave up is a failure too:
the work is still undone); the successful ones are committed all the same. A failed generation
is retried by the next run until it has failed max_attempts times; `--max-attempts N` retries
given-up ones again. `sl_dataset` is never rebuilt smaller because chains of prompts still
selected are incomplete under these settings (failed, given up, or outside --limit after a
constitution or model change): the old table is kept and the run exits 1, unless --allow-shrink.
Rows of prompts no longer selected (--splits) may go, with a warning.

The job runs on the Spark-native data plane: the plan, the pending anti-join and the next round's
inputs are Spark DataFrames, the executors generate and append to generation_events with delta-spark,
one idempotent append per chunk of `batches_per_commit` batches, as many chunks at once as executor
slots. One run per lake at a time (a kernel-held lock). A prompt with a sl_dataset row built from the
same plan, whose final event is still in generation_events, is done: a rerun plans and appends only
the others (`planned_prompts=` in the summary), and a no-op plans nothing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.backends import Sampling
from cai_lib.backends.models import model_fingerprint
from cai_lib.config import PointerConfig, opt, settings_from
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import parse_output
from cai_lib.lake.locks import job_lock
from cai_lib.lake.spark_delta import open_lake
from cai_lib.runtime.spark_plane import Plane, failure_counts, most_tries, pending, run_wave, selected_prompts, successful
from cai_lib.runtime.tasks import RunStats, new_job_run_id
from cai_lib.sl.chain import SLContext, SLSettings
from cai_lib.sl.spark_chain import built_from, open_prompts, plan_steps, sl_dataset_df, step_chat_of, wave_inputs
from jobs.common import MAX_NEW_TOKENS, Failures, GenerationConfig, guarded_replace_df, spark_job_main, write_pointer


@dataclass
class SLGenerateConfig(GenerationConfig, PointerConfig):
    MODEL_FIELDS = ("base_model",)
    base_model: str = opt("default", "the helpful model that answers, critiques and revises: 'default' "
                                     "(embedded SmolLM2-135M-Instruct), a model folder or a cached hub id")
    constitution: str = opt("constitutions/default.yaml", "constitution YAML (or the paper's JSON)")
    rounds: int = opt(4, "critique -> revision rounds per red-team prompt (the paper used 4; at most 16: each round "
                         "is two more model calls per prompt, and the paper's harmlessness gains flatten after a few)",
                      lo=1, hi=16)
    few_shot: int = opt(0, "worked critique/revision examples from the constitution prepended to each step "
                           "(at most 16: each one lengthens every prompt)", lo=0, hi=16)
    answer_max_new_tokens: int = opt(128, "token budget of first answers", **MAX_NEW_TOKENS)
    critique_max_new_tokens: int = opt(96, "token budget of critiques", **MAX_NEW_TOKENS)
    revision_max_new_tokens: int = opt(128, "token budget of revisions", **MAX_NEW_TOKENS)
    allow_shrink: bool = opt(False, "replace sl_dataset even when incomplete chains would make it smaller")

    def settings(self) -> SLSettings:
        s = lambda n: Sampling(self.temperature, self.top_p, n)  # noqa: E731
        return settings_from(self, SLSettings, answer=s(self.answer_max_new_tokens),
                             critique=s(self.critique_max_new_tokens), revision=s(self.revision_max_new_tokens))



def incomplete_chains(mine: int, total: int, fails: Failures) -> str:
    """Why sl_dataset would lose `total` rows of selected prompts, `mine` of them in this run."""
    return (f"their chains are incomplete under these settings (constitution, model, rounds): {mine} of those "
            f"prompts were in this run ({fails.failed} generations failed, {fails.gave_up} gave up), "
            f"{total - mine} were not (outside --limit)")


@dataclass(frozen=True)
class SLPlan:
    """What this run plans: the selected prompts, those it opens (all of them unless sl_dataset stands),
    their chain steps, and the plan's identity (`built`)."""
    prompts: object
    opened: object
    steps: object
    stands: bool
    built: str


@dataclass(frozen=True)
class Increment:
    """The chosen steps without a success (`left`), their waves, and `only`: a filter to their prompts."""
    left: object
    waves: set
    only: object
    work: object
    work_prompts: object


def plan_of(spark, lake, ctx: SLContext, cfg: SLGenerateConfig) -> SLPlan:
    # checkpointed, not cached: a cached plan that reads a table is re-run after each write to it. (unpersist
    # does not free a local checkpoint; Spark's ContextCleaner drops its blocks once the DataFrame is unreferenced)
    prompts = selected_prompts(lake, cfg.splits, cfg.limit).localCheckpoint(eager=True)
    built = built_from(ctx, cfg.splits)
    # sl_dataset's rows stand when it was built from this plan and their final events exist (a restore may
    # have set some aside): only the prompts without a row are planned; else every prompt, and it is rebuilt
    opened, stands = open_prompts(lake, prompts, built)
    opened = opened.localCheckpoint(eager=True) if stands else prompts
    return SLPlan(prompts, opened, plan_steps(spark, ctx, opened).localCheckpoint(eager=True), stands, built)


def increment_of(lake, plan: SLPlan, n_chosen: int) -> Increment:
    """One pass over the events: the waves with a step still to do, and the prompts they belong to. A rerun
    with nothing left does no wave; an increment's waves join only its own prompts' steps."""
    from pyspark.sql import functions as F
    chosen = plan.steps.where("chosen")
    left = chosen.select("event_id", "wave", "prompt_id").join(
        successful(lake.df("generation_events")), "event_id", "left_anti").localCheckpoint(eager=True)
    waves = {r["wave"] for r in left.select("wave").distinct().collect()}
    live = left.select("prompt_id").distinct().localCheckpoint(eager=True)
    n_live = live.count()
    only = (lambda df: df) if n_live == n_chosen else (   # noqa: E731
        lambda df: df.join(F.broadcast(live) if n_live <= 100_000 else live, "prompt_id", "left_semi"))
    work, work_prompts = (only(df).localCheckpoint(eager=True) for df in (chosen, plan.prompts))
    return Increment(left, waves, only, work, work_prompts)


def run_waves(plane: Plane, ctx: SLContext, inc: Increment, rounds: int, max_attempts: int) -> tuple[RunStats, int]:
    """Each wave's pending generations through the plane: the run's stats and how many steps gave up."""
    from pyspark.sql import functions as F
    lake, total, exhausted = plane.lake, RunStats(), 0
    for wave in sorted(inc.waves):
        # a wave reads its own round and the one before (its parents) once: Delta skips the other files
        # by their min/max stats (each commit holds one wave), so a small increment scans little
        r = (wave + 1) // 2
        events = inc.only(lake.df("generation_events").where(F.col("round").between(max(r - 1, 0), r))).select(
            "target_event_id", "status", "text").localCheckpoint(eager=True)
        ok = successful(events)
        todo = pending(plane, wave_inputs(inc.work, ok, inc.work_prompts, wave), ok, failure_counts(events),
                       table="generation_events", plan_id=f"{plane.job_run_id}/{wave}", max_attempts=max_attempts,
                       plan_filter=F.col("round") == r)
        exhausted += todo.gave_up
        if todo.rows:
            plane.say(f"wave {wave}/{2 * rounds}: {todo.rows} generations in {todo.describe()}")
            total.add(run_wave(plane, todo, step_chat_of(ctx), parse_output))
    return total, exhausted


def write_sl_dataset(lake, ctx: SLContext, plan: SLPlan, fails: Failures, allow_shrink: bool) -> tuple[bool, list, list]:
    """sl_dataset from the successful events: the open prompts' complete chains appended when the table
    stands, else the whole table replaced, never smaller (guarded_replace_df): (changed, errors, warnings)."""
    ok = successful(lake.df("generation_events"))
    if plan.stands:
        new = sl_dataset_df(ctx, plan.steps, ok, plan.opened).localCheckpoint(eager=True)
        changed = new.count() > 0
        if changed:
            lake.append_df("sl_dataset", new, plan.built)
        return changed, [], []
    prompts = plan.prompts

    def why(unexplained) -> str:
        mine = unexplained.join(prompts.where("chosen").select("prompt_id"), "prompt_id", "left_semi").count()
        return incomplete_chains(mine, unexplained.count(), fails)
    return guarded_replace_df(lake, "sl_dataset", sl_dataset_df(ctx, plan.steps, ok, prompts), prompts, allow_shrink,
                              why, plan.built)


def run(spark, cfg: SLGenerateConfig, progress=None) -> dict:
    """The plan, the pending anti-join and each wave's inputs are Spark DataFrames; nothing per event runs
    on the driver (see cai_lib/runtime/spark_plane.py)."""
    lake = open_lake(cfg.lake, spark)
    constitution = load_constitution(cfg.constitution)
    fp = model_fingerprint(cfg.backend, cfg.base_model)
    ctx = SLContext(constitution, cfg.base_model, fp, cfg.backend, cfg.settings())
    job_run_id = new_job_run_id()
    # held from the first read: sl_dataset decides what is planned, and another run could change it
    with job_lock(cfg.lake, "sl-generate", job_run_id) as lock:
        plan = plan_of(spark, lake, ctx, cfg)
        n_planned, n_chosen = plan.opened.count(), plan.prompts.where("chosen").count()
        inc = increment_of(lake, plan, n_chosen)
        plane = Plane(spark, lake, cfg.backend_spec(cfg.base_model), ctx.constants(), job_run_id, cfg.batch_size,
                      cfg.batches_per_commit, cfg.chunk_seconds, progress, exclusive=lock is not None)
        total, exhausted = run_waves(plane, ctx, inc, cfg.rounds, cfg.max_attempts)
        # every chosen step without a success was in `left`
        fails = Failures.of("generations", total, exhausted, cfg.max_attempts,
                            most_tries(inc.left, lake.df("generation_events"), exhausted))
        changed, errors, warnings = write_sl_dataset(lake, ctx, plan, fails, cfg.allow_shrink)
    write_pointer(cfg.pointer, lake, ["generation_events", "sl_dataset"],
                  {"constitution_sha": constitution.sha256, "model_fingerprint": fp})
    return {"prompts": n_chosen, "generations": total.tasks,
            "model_calls": total.model_calls, "ok": total.ok, "failed": total.failed, "gave_up": exhausted,
            "inserted": total.inserted, "completion_tokens": total.completion_tokens,
            "sl_dataset_rows": lake.count("sl_dataset"), "sl_dataset_rewritten": changed, "planned_prompts": n_planned,
            "failures": [fails], "errors": errors, "warnings": warnings}


def main(argv=None) -> int:
    return spark_job_main(SLGenerateConfig, "sl_generate", argv, __doc__, run)


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("sl-generate"))
