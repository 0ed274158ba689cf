"""Quality gate: block bad data between stages (Great Expectations suites from schemas/suites.py).

    cai gate sl --lake lake          prompts + generation_events + sl_dataset, before SL training
    cai gate labels --lake lake      label_events + preference_dataset (+ the labeller's evaluation)
    cai gate prompts --lake lake     prompts only

Runs every check of the stage on the latest table versions (rows quarantined by an earlier
gate run excluded) and prints one line per check. Every run appends a `gate_events` row with
the verdict, the failing checks and the input versions (same data and thresholds = same
verdict id). Failing rows of row-level checks (duplicate ids, p_a out of range, empty
responses, boilerplate, ...) are copied to `quarantine` with the check as the reason (events
are never deleted; quarantined rows never train), so the next run judges what remains;
rate checks (refusal rates, swap consistency, ...) fail until the data or the thresholds in
params.yaml [gate] change. Each check blocks training or promotion (schemas/suites.py): a failed
(or INCOMPLETE: required but could not run, and not waived in [gate] `waive`) training check exits
1, so `dvc repro` stops there; a promotion check (the labeller's information: agreement, swap
consistency, spread, calibration) only makes the verdict NOT PROMOTABLE, which `cai promote` obeys.
Great Expectations data docs (HTML) are written under --docs-dir; the path is printed.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from cai_lib.config import (LakeConfig, PointerConfig, check_fields, check_value, load_config, opt,
                            read_params)
from cai_lib.ids import sha256_text, stable_id
from cai_lib.quality.frames import STAGE_TABLES, build_frames
from cai_lib.quality.gates import judge, suite_sha, validate
from cai_lib.runtime.tasks import new_job_run_id
from jobs.common import AtVersions, reader_of, write_pointer, writer_lake
from schemas.suites import ROW_KEYS, SUITES, UNINFORMATIVE


@dataclass
class GateConfig(LakeConfig, PointerConfig):
    # each threshold belongs to the suites of some stages (schemas/suites.py): another stage would ignore it
    FLAG_NEEDS = {
        "max_prompt_chars": ("stage", ("prompts", "sl")),
        **{k: ("stage", ("sl",)) for k in ("min_response_words", "max_response_words", "max_empty_rate",
                                           "max_unchanged_rate", "max_boilerplate_share", "boilerplate_min_rows",
                                           "max_red_team_refusal", "max_over_refusal", "refusal_min_n")},
        **{k: ("stage", ("labels",)) for k in ("eval_metrics", "clamp_lo", "clamp_hi", "rate_min_n", "max_label_skew",
                                               "max_position_bias", "min_swap_consistency", "min_human_agreement",
                                               "max_ece", "min_label_spread", "max_injection_rate", "review_min_n",
                                               "min_review_agreement")}}
    stage: str | None = opt(None, "prompts | sl | labels (also the first positional argument)")
    verbose: bool = opt(False, "print passed checks too (failed and skipped ones are always printed)")
    docs_dir: str = opt("reports/gates", "Great Expectations project + HTML data docs folder")
    eval_metrics: str | None = opt("metrics/eval_labeler.json", "cai eval-labeler's metrics JSON (labels gate)")
    max_prompt_chars: int = opt(4000, "longest prompt accepted", lo=1, hi=1_000_000)
    min_response_words: int = opt(3, "shortest non-empty SL response", lo=0)
    max_response_words: int = opt(400, "longest SL response", lo=1)
    max_empty_rate: float = opt(0.0, "share of empty SL responses allowed", lo=0.0, hi=1.0)
    max_unchanged_rate: float = opt(0.5, "share of revisions identical to the first answer allowed", lo=0.0, hi=1.0)
    max_boilerplate_share: float = opt(0.2, "a sentence/8-gram in more than this share of responses is boilerplate",
                                       lo=0.0, hi=1.0)
    boilerplate_min_rows: int = opt(10, "fewer SL responses than this: boilerplate is not judged", lo=1)
    max_red_team_refusal: float = opt(0.75, "per category: refusal rate on red-team prompts (evasiveness)", lo=0.0, hi=1.0)
    max_over_refusal: float = opt(0.25, "per category: refusal rate on benign prompts (over-refusal)", lo=0.0, hi=1.0)
    refusal_min_n: int = opt(3, "categories with fewer responses are not judged", lo=1)
    clamp_lo: float | None = opt(None, "CoT label clamp (default: params.yaml [label] clamp_lo)", lo=0.0, lt=0.5)
    clamp_hi: float | None = opt(None, "CoT label clamp (default: params.yaml [label] clamp_hi)", gt=0.5, hi=1.0)
    rate_min_n: int = opt(20, "labels: rates over fewer AI labels (or human pairs) than this are not judged", lo=1)
    max_label_skew: float = opt(0.25, "|mean p_a - 0.5| allowed", lo=0.0, hi=0.5)
    max_position_bias: float = opt(0.15, "|mean p_shown_a - 0.5| allowed", lo=0.0, hi=0.5)
    min_swap_consistency: float = opt(0.5, "lower end of the 95% interval of the swap-consistent share",
                                      lo=0.0, hi=1.0)
    min_human_agreement: float = opt(0.5, "the lower end of the 95% interval of the agreement must be above this",
                                     lo=0.0, hi=1.0)
    review_min_n: int = opt(20, "labels: fewer audit verdicts naming a side (cai review serve) than this: reviewer "
                                "agreement is not judged (skipped, never passed)", lo=1)
    min_review_agreement: float = opt(0.5, "the lower end of the 95% interval of the agreement with reviewers on "
                                           "the audit sample must be above this", lo=0.0, hi=1.0)
    max_ece: float = opt(0.15, "labeller's expected calibration error", lo=0.0, hi=1.0)
    min_label_spread: float = opt(0.02, "std of p_a below this = a (nearly) constant labeller (a std of values in "
                                        "[0, 1] is at most 0.5)", lo=0.0, hi=0.5)
    max_injection_rate: float = opt(0.0, "share of AI-labelled comparisons allowed to have a response that addresses "
                                          "the labeller (cai_lib/quality/injection.py); failing ones are quarantined",
                                     lo=0.0, hi=1.0)
    waive: list = opt([], "required checks allowed to be INCOMPLETE (could not run), by name; kept in the verdict")

    def __post_init__(self):
        check_fields(self)   # bounds and choices, as load_config checks them, for configs built in code
        if self.stage not in SUITES:
            raise ValueError(f"which gate? pass one of {', '.join(SUITES)} (e.g. `cai gate sl`), got {self.stage!r}")
        label = read_params(self.params).get("label") or {}
        for key, default in (("clamp_lo", 0.4), ("clamp_hi", 0.6)):   # the label job's clamps, checked as its own
            if getattr(self, key) is None:
                setattr(self, key, check_value(GateConfig, key, label.get(key, default), f"{self.params} [label]"))
        names = {c.name for st in SUITES.values() for c in st(self) if c.required}
        unknown = [w for w in self.waive if w not in names]
        if unknown:
            raise ValueError(f"params [gate] waive names {unknown}, which are not required checks; "
                             f"the required checks are {sorted(names)}")


def quarantine_rows(stage: str, results, frames, job_run_id: str, now) -> list[dict]:
    rows = []
    for r in results:
        if r.status != "failed" or not r.bad_keys:
            continue
        key, table = ROW_KEYS[r.frame]
        df = frames[r.frame]
        for k in r.bad_keys:
            payload = df[df[key].astype(str) == k].head(1).to_json(orient="records", date_format="iso",
                                                                    default_handler=str)
            rows.append({"event_id": stable_id("quarantine", stage=f"gate_{stage}", table=table, key=k, check=r.name),
                         "stage": f"gate_{stage}", "source": table, "source_row": None, "field": r.column,
                         "reason": f"{r.name}: {r.why}", "payload": payload[:2000], "job_run_id": job_run_id,
                         "created_at": now, "row_key": k})
    return rows


def _lineage(frames, column: str) -> str | None:
    values = sorted({v for df in frames.values() if df is not None and column in df for v in df[column].dropna()})
    return ",".join(values) if values else None


def run(cfg: GateConfig) -> tuple[bool, dict]:
    lake = writer_lake(cfg, f"gate-{cfg.stage}")   # quarantine and the verdict go in here
    stage = cfg.stage
    tables = STAGE_TABLES[stage] + ["quarantine"] + (["review_events"] if stage == "labels" else [])
    source = reader_of(lake)                        # what is judged is read here, at the versions recorded
    versions = {t: source.version(t) for t in tables}
    checks = SUITES[stage](cfg)
    built = build_frames(stage, AtVersions(source, versions), cfg)
    results, docs = validate(stage, built.frames, checks, built.notes, cfg.docs_dir)
    j = judge(results, checks, cfg.waive)
    failed = [r for r in results if r.status == "failed"]
    now = datetime.now(timezone.utc)
    job_run_id = new_job_run_id()
    q_rows = quarantine_rows(stage, results, built.frames, job_run_id, now)
    quarantined = lake.insert_new("quarantine", pa.Table.from_pylist(q_rows)) if q_rows else 0
    # reviewers' verdicts are judged too; while there is no review_events table, earlier verdicts keep their ids
    inputs = {t: v for t, v in versions.items() if t != "review_events" or v is not None}
    if stage == "labels" and built.frames.get("labeller_eval") is not None:
        inputs["eval_metrics_sha"] = sha256_text(open(cfg.eval_metrics).read())[:16]
    sha = suite_sha(checks)
    failures = [{"check": r.name, "status": r.status, "blocks": r.blocks, "expectation": r.expectation,
                 "observed": r.observed, "bad_rows": r.unexpected_count, "note": r.note}
                for r in results if r.blocking]
    verdict = {
        "event_id": stable_id("gate_verdict", stage=stage, suite=sha, inputs=json.dumps(inputs, sort_keys=True),
                              waive=sorted(cfg.waive)),
        "kind": "gate_verdict", "stage": stage, "passed": j.passed, "verdict": j.verdict, "promotable": j.promotable,
        "incomplete_checks": j.incomplete, "waived_checks": j.waived, "promotion_blockers": j.promotion_blockers,
        "n_checks": len(results),
        "n_failed": len(failed), "failed_checks": [r.name for r in failed],
        "failures": json.dumps(failures, sort_keys=True, default=str), "n_quarantined": quarantined,
        "suite_sha": sha, "input_versions": json.dumps(inputs, sort_keys=True),
        "constitution_sha": _lineage(built.frames, "constitution_sha"), "model_id": _lineage(built.frames, "model_id"),
        "docs_path": docs, "job_run_id": job_run_id, "created_at": now,
    }
    lake.insert_new("gate_events", pa.Table.from_pylist([verdict]))
    for r in results:
        if r.status != "passed" or cfg.verbose:
            print("  " + r.line())
    for frame, note in built.notes.items():
        if built.frames.get(frame) is not None or frame in {r.frame for r in results if r.status != "skipped"}:
            print(f"  measured {frame}: {note}")
    if j.passed:
        write_pointer(cfg.pointer, lake, STAGE_TABLES[stage], {"gate": stage, "passed": True,
                                                               "promotable": j.promotable,
                                                               "verdict_id": verdict["event_id"]})
    summary = {"stage": stage, "passed": j.passed, "verdict": j.verdict, "promotable": j.promotable,
               "checks": len(results), "failed": len(failed), "incomplete": j.incomplete, "waived": j.waived,
               "promotion_blockers": j.promotion_blockers,
               "training_blockers": [r.name for r in results if r.blocking and r.blocks == "training"],
               "skipped": sum(r.status == "skipped" for r in results), "quarantined": quarantined,
               "verdict_id": verdict["event_id"][:12], "data_docs": docs}
    return j.passed, summary


def verdict_line(stage: str, s: dict) -> str:
    """The gate's one-line verdict: what it blocks, and why in words for the labeller checks."""
    if s["verdict"] == "failed":
        head = f"FAILED ({', '.join(s['training_blockers'])}): training is blocked"
        if s["promotion_blockers"]:
            head += f" (and promotion: {', '.join(s['promotion_blockers'])})"
    elif s["verdict"] == "incomplete":
        head = f"INCOMPLETE ({', '.join(s['incomplete'])} could not run): training is blocked; run what they " \
               "need or waive them by name in params.yaml [gate] waive"
    elif s["verdict"] == "not_promotable":
        why = ", ".join(s["promotion_blockers"])
        plain = (" the labels are uninformative (no better than chance against human labels, reviewers or across A/B order);"
                 if any(b in UNINFORMATIVE for b in s["promotion_blockers"]) else "")
        head = f"PASSED for training, NOT PROMOTABLE ({why}):{plain} no model trained on them can become champion"
    else:
        head = "PASSED"
    waived = f", waived={','.join(s['waived'])}" if s["waived"] else ""
    return (f"gate {stage}: {head}; checks={s['checks']}, skipped={s['skipped']}, quarantined={s['quarantined']}"
            f"{waived}, verdict={s['verdict_id']}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--stage", argv[0], *argv[1:]]
    cfg = load_config(GateConfig, "gate", argv, __doc__)
    passed, summary = run(cfg)
    print(verdict_line(cfg.stage, summary))
    print(f"data docs: {summary['data_docs']}")
    return 0 if passed else 1


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("gate"))
