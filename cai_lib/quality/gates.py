"""Run a gate's checks with Great Expectations and say which failed, on which rows.

One file-backed GX project (`docs_dir/gx`) holds a suite and a checkpoint per (stage, frame);
every run stores its validation results there and refreshes the HTML data docs, so the
docs show the history of verdicts. Results are returned per `Check` (by the name in its
`meta`), with the keys of the failing rows for row-level checks.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from schemas.suites import ROW_KEYS, Check


@dataclass
class CheckResult:
    name: str
    frame: str
    expectation: str
    status: str                     # passed | failed | skipped | incomplete | waived
    observed: object = None         # the observed value (rates, means) or the bad row count
    unexpected_count: int | None = None
    unexpected_share: float | None = None  # of the non-null rows checked
    bad_keys: list[str] = field(default_factory=list)  # row-level failures: keys of the failing rows
    note: str = ""
    why: str = ""
    row_level: bool = False
    column: str | None = None
    blocks: str = "training"

    @property
    def blocking(self) -> bool:
        return self.status in ("failed", "incomplete")

    def line(self) -> str:
        what = ""
        if self.unexpected_count is not None:
            what = f"bad_rows={self.unexpected_count}"
            if self.unexpected_share is not None:
                what += f" ({self.unexpected_share:.1%})"
        elif self.observed is not None:
            what = f"observed={_short(self.observed)}"
        stops = f" (blocks {self.blocks})" if self.blocking else ""
        return f"{self.status.upper():10s} {self.name}{stops} [{self.expectation}] {what} {self.note}".rstrip()


@dataclass
class Judgement:
    """What a gate run decides. `passed`: training may read the data (no training-blocking check
    failed or is INCOMPLETE); `promotable`: nothing at all blocks, so models trained on it may
    become champion. `verdict` is the one word: passed | failed | incomplete | not_promotable."""
    verdict: str
    passed: bool
    promotable: bool
    failed: list[str]
    incomplete: list[str]
    waived: list[str]
    promotion_blockers: list[str]


def judge(results: list[CheckResult], checks: list[Check], waive: list[str]) -> Judgement:
    """Mark skipped required checks INCOMPLETE (or WAIVED when `waive` names them) and decide.
    A waiver covers a check that could not run, never one that ran and failed."""
    by_name = {c.name: c for c in checks}
    for r in results:
        c = by_name[r.name]
        r.blocks = c.blocks
        if r.status == "skipped" and c.required:
            r.status = "waived" if c.name in waive else "incomplete"
    training = [r.name for r in results if r.blocking and r.blocks == "training"]
    promotion = [r.name for r in results if r.blocking and r.blocks == "promotion"]
    failed = [r.name for r in results if r.status == "failed"]
    incomplete = [r.name for r in results if r.status == "incomplete"]
    if any(r.status == "failed" and r.blocks == "training" for r in results):
        verdict = "failed"
    elif training:
        verdict = "incomplete"
    elif promotion:
        verdict = "not_promotable"
    else:
        verdict = "passed"
    return Judgement(verdict, not training, not training and not promotion, failed, incomplete,
                     [r.name for r in results if r.status == "waived"], promotion)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)[:120]


def suite_sha(checks: list[Check]) -> str:
    """Changes whenever a check, its bounds (thresholds) or its reason changes."""
    body = json.dumps([asdict(c) for c in checks], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _context(docs_dir: str):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=docs_dir)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.variables.save()
    return ctx


def _expectation(check: Check):
    import great_expectations as gx
    cls = getattr(gx.expectations, check.expectation)
    return cls(**check.kwargs, meta={"check": check.name, "why": check.why})


def _observed(result: dict, check: Check):
    if "observed_value" in result:
        v = result["observed_value"]
        return float(v) if hasattr(v, "__float__") and not isinstance(v, (bool, str)) else v
    return result.get("unexpected_count")


def validate(stage: str, frames: dict[str, pd.DataFrame | None], checks: list[Check], notes: dict[str, str],
             docs_dir: str) -> tuple[list[CheckResult], str]:
    """Validate each frame with its checks; return results in `checks` order and the docs index path."""
    import great_expectations as gx
    ctx = _context(docs_dir)
    source = ctx.data_sources.add_or_update_pandas("lake")
    by_frame: dict[str, list[Check]] = {}
    for c in checks:
        by_frame.setdefault(c.frame, []).append(c)
    results: dict[str, CheckResult] = {}
    for frame, fchecks in by_frame.items():
        df = frames.get(frame)
        base = [c for c in fchecks if c.expectation == "ExpectTableRowCountToBeBetween"]
        if df is None or (df.empty and base):
            note = notes.get(frame, "nothing to check") if df is None else "frame is empty"
            for c in fchecks:
                if df is None or c not in base:
                    results[c.name] = CheckResult(c.name, frame, c.expectation, "skipped", note=note, why=c.why,
                                                  row_level=c.row_level, column=c.kwargs.get("column"))
            fchecks = base if df is not None else []
            if not fchecks:
                continue
        name = f"{stage}.{frame}"
        asset = next((a for a in source.assets if a.name == name), None) or source.add_dataframe_asset(name)
        batch = next((b for b in asset.batch_definitions if b.name == "latest"), None) \
            or asset.add_batch_definition_whole_dataframe("latest")
        suite = gx.ExpectationSuite(name=name, expectations=[_expectation(c) for c in fchecks])
        suite = ctx.suites.add_or_update(suite)
        vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        fmt = {"result_format": "COMPLETE"}
        if frame in ROW_KEYS:
            fmt["unexpected_index_column_names"] = [ROW_KEYS[frame][0]]
        cp = ctx.checkpoints.add_or_update(gx.Checkpoint(
            name=f"gate.{name}", validation_definitions=[vd], result_format=fmt,
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
        run = cp.run(batch_parameters={"dataframe": df})
        by_name = {c.name: c for c in fchecks}
        for vr in run.run_results.values():
            for er in vr.results:
                c = by_name[er.expectation_config.meta["check"]]
                res = er.result or {}
                keys = sorted({str(row[ROW_KEYS[frame][0]]) for row in res.get("unexpected_index_list") or []
                               if isinstance(row, dict)}) if c.row_level and not er.success else []
                results[c.name] = CheckResult(
                    c.name, frame, c.expectation, "passed" if er.success else "failed",
                    observed=_observed(res, c), unexpected_count=res.get("unexpected_count"), bad_keys=keys,
                    unexpected_share=(res["unexpected_percent"] / 100 if res.get("unexpected_percent") is not None
                                      else None),
                    note=notes.get(frame, "") if not er.success else "", why=c.why, row_level=c.row_level,
                    column=c.kwargs.get("column"))
                if er.exception_info and er.exception_info.get("raised_exception"):
                    results[c.name].note = f"error: {er.exception_info.get('exception_message')}"
    sites = ctx.get_docs_sites_urls()
    docs = sites[0]["site_url"].removeprefix("file://") if sites else ""
    return [results[c.name] for c in checks], docs
