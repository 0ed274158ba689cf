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
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.backends import Sampling
from cai_lib.backends.models import model_fingerprint
from cai_lib.config import PointerConfig, opt, settings_from
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import parse_output
from cai_lib.lake.queries import known_events, select_prompts
from cai_lib.lake.spark_delta import open_lake
from cai_lib.runtime.tasks import RunStats, commit_progress, most_tries, new_job_run_id, run_tasks
from cai_lib.sl.chain import SLContext, SLSettings, derive_sl_dataset, pending_tasks, plan_chain
from jobs.common import Failures, GenerationConfig, guarded_replace, spark_job_main, write_pointer


@dataclass
class SLGenerateConfig(GenerationConfig, PointerConfig):
    MODEL_FIELDS = ("base_model",)
    base_model: str = opt("default", "the helpful model that answers, critiques and revises: 'default' "
                                     "(embedded SmolLM2-135M-Instruct), a model folder or a cached hub id")
    constitution: str = opt("constitutions/default.yaml", "constitution YAML (or the paper's JSON)")
    rounds: int = opt(4, "critique -> revision rounds per red-team prompt (the paper used 4)")
    few_shot: int = opt(0, "worked critique/revision examples from the constitution prepended to each step")
    answer_max_new_tokens: int = opt(128, "token budget of first answers")
    critique_max_new_tokens: int = opt(96, "token budget of critiques")
    revision_max_new_tokens: int = opt(128, "token budget of revisions")
    allow_shrink: bool = opt(False, "replace sl_dataset even when incomplete chains would make it smaller")

    def settings(self) -> SLSettings:
        s = lambda n: Sampling(self.temperature, self.top_p, n)  # noqa: E731
        return settings_from(self, SLSettings, answer=s(self.answer_max_new_tokens),
                             critique=s(self.critique_max_new_tokens), revision=s(self.revision_max_new_tokens))



def run(spark, cfg: SLGenerateConfig, progress=None) -> dict:
    lake = open_lake(cfg.lake, spark)  # native Delta where the session has it, else delta-rs
    constitution = load_constitution(cfg.constitution)
    fp = model_fingerprint(cfg.backend, cfg.base_model)
    ctx = SLContext(constitution, cfg.base_model, fp, cfg.backend, cfg.settings())
    prompts, chosen = select_prompts(lake, cfg.splits, cfg.limit)
    texts_by_pid = dict(zip(prompts["prompt_id"].to_pylist(), prompts["text"].to_pylist()))
    # Plan every prompt of the splits (ids are cheap hashes): sl_dataset covers all complete
    # chains, while only the `limit` chosen ones are generated in this run.
    plans = {pid: plan_chain(ctx, pid, kind) for pid, kind in zip(prompts["prompt_id"].to_pylist(),
                                                                   prompts["kind"].to_pylist())}
    todo = {pid: plan for pid, plan in plans.items() if pid in chosen}
    texts, failures = known_events(lake, {s.event_id for chain in plans.values() for s in chain})
    job_run_id = new_job_run_id()
    total, exhausted = RunStats(), 0
    for wave in range(0, 2 * cfg.rounds + 1):
        tasks, gave_up = pending_tasks(ctx, todo, texts_by_pid, wave, texts, failures, cfg.max_attempts)
        exhausted += gave_up
        if not tasks:
            continue
        if progress:
            progress(f"wave {wave}/{2 * cfg.rounds}: {len(tasks)} generations")
        stats, rows = run_tasks(spark, lake, tasks, cfg.backend_spec(cfg.base_model), ctx.constants(),
                                batch_size=cfg.batch_size, batches_per_commit=cfg.batches_per_commit,
                                job_run_id=job_run_id, parse=parse_output,
                                on_commit=commit_progress(progress, len(tasks)))
        total.add(stats)
        for r in rows.select(["target_event_id", "status", "text"]).to_pylist():
            if r["status"] == "ok":
                texts[r["target_event_id"]] = r["text"]
    planned = {s.event_id for chain in todo.values() for s in chain}
    fails = Failures.of("generations", total, exhausted, cfg.max_attempts, most_tries(planned, texts, failures))

    def why(pids) -> str:
        mine = sum(1 for p in pids if p in todo)
        return (f"their chains are incomplete under these settings (constitution, model, rounds): {mine} of those "
                f"prompts were in this run ({fails.failed} generations failed, {fails.gave_up} gave up), "
                f"{len(pids) - mine} were not (outside --limit)")
    dataset = derive_sl_dataset(ctx, plans, prompts, texts)
    dataset_changed, errors, warnings = guarded_replace(lake, "sl_dataset", dataset, set(plans), cfg.allow_shrink, why)
    write_pointer(cfg.pointer, lake, ["generation_events", "sl_dataset"],
                  {"constitution_sha": constitution.sha256, "model_fingerprint": fp})
    return {"prompts": len(todo), "generations": total.tasks, "model_calls": total.model_calls,
            "ok": total.ok, "failed": total.failed, "gave_up": exhausted, "inserted": total.inserted,
            "completion_tokens": total.completion_tokens, "sl_dataset_rows": lake.count("sl_dataset"),
            "sl_dataset_rewritten": dataset_changed, "failures": [fails], "errors": errors, "warnings": warnings}


def main(argv=None) -> int:
    return spark_job_main(SLGenerateConfig, "sl_generate", argv, __doc__, run)


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("sl-generate"))
