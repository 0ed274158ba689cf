"""Arrow schemas of the lake tables and how each is written.

`nullable=False` marks key and lineage columns: delta-rs refuses a write that puts a null
there, and `cai_lib.lake.tables` checks it first to name the column and row. Event tables are
append-only (`delta.appendOnly=true`): rows are inserted once, keyed on `key`, never updated.
Derived tables (`sl_dataset`) are rebuilt from the events and replaced whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from schemas.review import REVIEW_EVENTS

UTC_TS = pa.timestamp("us", tz="UTC")

PROMPT_KINDS = ("red_team", "helpful")
GENERATION_KINDS = (
    "initial_response",  # the helpful model's first answer to a red-team prompt
    "critique",          # round r: the model critiques its latest answer against one principle
    "revision",          # round r: the model rewrites its answer following the critique
    "helpful_response",  # the model's answer to a helpfulness prompt (joins the SL data as is)
    "pair_sample",       # RLAIF: one of two sampled responses per prompt
    "cot",               # RLAIF: the feedback model's chain of thought
    "eval_response",     # cai evaluate: a model's answer to a held-out prompt
)


def _f(name: str, typ: pa.DataType, nullable: bool = True, doc: str = "") -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc} if doc else None)


PROMPTS = pa.schema([
    _f("prompt_id", pa.string(), False, "sha256 of kind + normalised text: same prompt, same id"),
    _f("text", pa.string(), False),
    _f("kind", pa.string(), False, "red_team | helpful"),
    _f("source", pa.string(), False, "the file it was ingested from"),
    _f("source_row", pa.int64(), False, "0-based record index in that file"),
    _f("source_format", pa.string(), False),
    _f("category", pa.string()),
    _f("tags", pa.list_(pa.string())),
    _f("split", pa.string(), False, "train | test, a deterministic function of prompt_id"),
    _f("meta", pa.string(), doc="other fields of the source record, as JSON"),
    _f("created_at", UTC_TS, False),
])

GENERATION_EVENTS = pa.schema([
    _f("event_id", pa.string(), False, "sha256 of kind, parents, principle, constitution, model, template, sampling, seed"),
    _f("kind", pa.string(), False, "one of GENERATION_KINDS"),
    _f("status", pa.string(), False, "ok | failed (a failed attempt keeps its own id and the error)"),
    _f("target_event_id", pa.string(), False, "the id this attempt produces when it succeeds (= event_id when ok)"),
    _f("attempt", pa.int32(), False),
    _f("prompt_id", pa.string(), False),
    _f("parent_id", pa.string(), doc="the event this generation continues (null for a first answer)"),
    _f("round", pa.int32(), False, "0 for first answers, 1..R for critique/revision rounds; pair_sample: sample index"),
    _f("principle_id", pa.string()),
    _f("constitution_id", pa.string(), False),
    _f("constitution_sha", pa.string(), False),
    _f("model_id", pa.string(), False),
    _f("model_fingerprint", pa.string(), False),
    _f("backend", pa.string(), False),
    _f("template_sha", pa.string(), False),
    _f("sampling", pa.string(), False, "sampling params as canonical JSON"),
    _f("seed", pa.int64(), False),
    _f("text", pa.string(), doc="null when status = failed"),
    _f("finish_reason", pa.string(), doc="stop | length | error"),
    _f("prompt_tokens", pa.int32()),
    _f("completion_tokens", pa.int32()),
    _f("latency_ms", pa.float64(), doc="the batch's wall time divided by its size"),
    _f("error", pa.string()),
    _f("job_run_id", pa.string(), False, "the job run that wrote the row (not part of the id)"),
    _f("created_at", UTC_TS, False),
])

QUARANTINE = pa.schema([
    _f("event_id", pa.string(), False, "sha256 of stage, source, row and reason: re-ingesting adds nothing"),
    _f("stage", pa.string(), False, "ingest | sl_generate | gate ..."),
    _f("source", pa.string(), False),
    _f("source_row", pa.int64()),
    _f("field", pa.string()),
    _f("reason", pa.string(), False),
    _f("payload", pa.string(), doc="the raw record, truncated"),
    _f("job_run_id", pa.string(), False),
    _f("created_at", UTC_TS, False),
    _f("row_key", pa.string(), doc="gate: the quarantined row's key in `source` (excluded from training)"),
])

GATE_EVENTS = pa.schema([
    _f("event_id", pa.string(), False, "sha256 of stage, suite (thresholds included) and input table versions"),
    _f("kind", pa.string(), False, "gate_verdict"),
    _f("stage", pa.string(), False, "prompts | sl | labels"),
    _f("passed", pa.bool_(), False, "training may read the data: no training-blocking check failed or is incomplete"),
    _f("verdict", pa.string(), doc="passed | failed | incomplete | not_promotable (promotion: promoted | refused)"),
    _f("promotable", pa.bool_(), doc="nothing blocks promotion: models trained on this data may become champion"),
    _f("incomplete_checks", pa.list_(pa.string()), doc="required checks that could not run"),
    _f("waived_checks", pa.list_(pa.string()), doc="incomplete checks params.yaml [gate] waive allowed"),
    _f("promotion_blockers", pa.list_(pa.string()), doc="checks that failed (or are incomplete) and block promotion"),
    _f("n_checks", pa.int32(), False),
    _f("n_failed", pa.int32(), False),
    _f("failed_checks", pa.list_(pa.string()), False, "names of the failing expectations"),
    _f("failures", pa.string(), False, "JSON: per failing check its expectation, observed value, bad row count"),
    _f("n_quarantined", pa.int32(), False, "rows this run moved to quarantine"),
    _f("suite_sha", pa.string(), False, "sha256 of the suites' JSON, thresholds included"),
    _f("input_versions", pa.string(), False, "JSON: table -> Delta version the verdict is about"),
    _f("constitution_sha", pa.string(), doc="the constitutions in the checked rows, comma-joined"),
    _f("model_id", pa.string(), doc="the models in the checked rows, comma-joined"),
    _f("docs_path", pa.string(), doc="the Great Expectations data docs (HTML)"),
    _f("job_run_id", pa.string(), False),
    _f("created_at", UTC_TS, False),
])

SL_DATASET = pa.schema([
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False),
    _f("response", pa.string(), False),
    _f("source_kind", pa.string(), False, "revision (red-team, after R rounds) | helpful_response"),
    _f("category", pa.string()),
    _f("split", pa.string(), False),
    _f("rounds", pa.int32(), False),
    _f("final_event_id", pa.string(), False),
    _f("chain_event_ids", pa.list_(pa.string()), False, "initial, critique 1, revision 1, ... in order"),
    _f("principle_ids", pa.list_(pa.string()), False, "one per round"),
    _f("constitution_sha", pa.string(), False),
    _f("model_id", pa.string(), False),
    _f("model_fingerprint", pa.string(), False),
])


LABEL_EVENTS = pa.schema([
    _f("event_id", pa.string(), False, "sha256 of pair, order, principle, ensemble index, constitution, model, template, cot"),
    _f("kind", pa.string(), False, "ai_label | ai_label_cot"),
    _f("status", pa.string(), False),
    _f("pair_id", pa.string(), False, "sha256 of the prompt and the two responses' event ids"),
    _f("prompt_id", pa.string(), False),
    _f("response_a_id", pa.string(), False, "the pair's response A (canonical, whatever the order shown)"),
    _f("response_b_id", pa.string(), False),
    _f("order", pa.string(), False, "ab: A shown as option (A); ba: A shown as option (B)"),
    _f("ensemble_index", pa.int32(), False, "k of K principles sampled for this pair"),
    _f("principle_id", pa.string(), False),
    _f("logprob_shown_a", pa.float64(), False, "raw log P(' (A)' | prompt)"),
    _f("logprob_shown_b", pa.float64(), False, "raw log P(' (B)' | prompt)"),
    _f("p_shown_a", pa.float64(), False, "normalised P(option (A)) as shown (position bias lives here)"),
    _f("p_a", pa.float64(), False, "P(response A is better): p_shown_a for ab, 1 - p_shown_a for ba; CoT: clamped"),
    _f("cot_event_id", pa.string(), doc="the chain of thought read before scoring (ai_label_cot)"),
    _f("constitution_id", pa.string(), False),
    _f("constitution_sha", pa.string(), False),
    _f("model_id", pa.string(), False, "the feedback model"),
    _f("model_fingerprint", pa.string(), False),
    _f("backend", pa.string(), False),
    _f("template_sha", pa.string(), False),
    _f("job_run_id", pa.string(), False),
    _f("created_at", UTC_TS, False),
])

PREFERENCE_DATASET = pa.schema([
    _f("pair_id", pa.string(), False),
    _f("prompt_id", pa.string(), False),
    _f("prompt", pa.string(), False, "the conversation before the two responses"),
    _f("response_a", pa.string(), False),
    _f("response_b", pa.string(), False),
    _f("target", pa.float64(), False, "P(A is better): soft for AI labels, 0 or 1 for human pairs"),
    _f("source", pa.string(), False, "ai_harmless | human_helpful"),
    _f("consistent", pa.bool_(), doc="AI labels: every principle's two orders agree on the side"),
    _f("n_labels", pa.int32(), False),
    _f("label_event_ids", pa.list_(pa.string()), False),
    _f("response_a_id", pa.string()),
    _f("response_b_id", pa.string()),
    _f("constitution_sha", pa.string()),
    _f("feedback_model_fingerprint", pa.string()),
    _f("origin", pa.string(), False, "where the pair came from (lake, or file:row for human pairs)"),
])


WORK_BATCHES = pa.schema([
    _f("work_id", pa.string(), False, "event_id#attempt: one planned attempt of one event"),
    _f("target_table", pa.string(), False, "the event table the attempt's row goes to"),
    _f("event_id", pa.string(), False),
    _f("attempt", pa.int32(), False),
    _f("round", pa.int32(), False, "the event's round (lets a wave's read skip the other rounds' files)"),
    _f("plan_id", pa.string(), False, "job_run_id/wave: the run and wave that cut the batch"),
    _f("pos", pa.int64(), False, "position in the plan (its order inside a batch)"),
    _f("batch_no", pa.int64(), False, "rows of one plan and batch_no are one model call"),
    _f("chunk", pa.int64(), False, "rows of one plan and chunk are one commit"),
    _f("created_at", UTC_TS, False),
])


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: str
    append_only: bool  # event tables: insert-only; derived tables: replaced whole


TABLES: dict[str, TableSpec] = {
    s.name: s
    for s in (
        TableSpec("prompts", PROMPTS, "prompt_id", True),
        TableSpec("generation_events", GENERATION_EVENTS, "event_id", True),
        TableSpec("quarantine", QUARANTINE, "event_id", True),
        TableSpec("sl_dataset", SL_DATASET, "prompt_id", False),
        TableSpec("label_events", LABEL_EVENTS, "event_id", True),
        TableSpec("preference_dataset", PREFERENCE_DATASET, "pair_id", False),
        TableSpec("gate_events", GATE_EVENTS, "event_id", True),
        # the Spark plane's batch plan: a resumed run re-cuts an interrupted attempt into the same batch
        TableSpec("work_batches", WORK_BATCHES, "work_id", True),
        TableSpec("review_events", REVIEW_EVENTS, "event_id", True),   # people's verdicts (schemas/review.py)
    )
}
