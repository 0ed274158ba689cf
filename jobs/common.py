"""What the jobs share: their config groups, pointer files for DVC, the printed summary and exit status,
the guarded rebuild of derived tables, the training ending."""
from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cai_lib.backends.fake import check_fake_model
from cai_lib.backends.models import check_model_early
from cai_lib.constitution.load import load_constitution
from cai_lib.config import LakeConfig, RegistryConfig, SeedConfig, SparkModelConfig, check_fields, opt
from cai_lib.files import write_json
from cai_lib.lake.tables import Lake, check_lake_target, is_uri, read_schema


SPLITS = ("train", "test")   # ingest's splits: test is held out for evaluation, never trained on
TEMPERATURE = dict(lo=0.0, hi=10.0)   # 0 = greedy; far above 2 a model samples noise
MAX_NEW_TOKENS = dict(lo=1, hi=32768)   # a token budget beyond a long context window is a typo


@dataclass
class ModelJobConfig(LakeConfig, SeedConfig, SparkModelConfig):
    """Jobs that run a model on the Spark-native data plane (sl-generate, sample-pairs, label, eval-labeler,
    evaluate: cai_lib/runtime/spark_plane.py)."""
    batch_size: int = opt(16, "sequences per model call; a batch is also the unit of resume", lo=1, hi=4096)
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()   # the fields naming models this job runs on the backend

    def __post_init__(self):
        check_fields(self)   # bounds and choices, as load_config checks them, for configs built in code
        for model in self.backend_models():   # before Spark starts: a fake run never borrows a real model's name
            check_model_early(self.backend, model)   # and a real model's folder: no pickles (file heads only)
        if getattr(self, "constitution", None):   # a bad constitution (hidden characters, ...) before Spark starts
            load_constitution(self.constitution)

    def backend_models(self) -> list[str]:
        return [getattr(self, f) for f in self.MODEL_FIELDS if getattr(self, f) is not None]

    def backend_spec(self, model: str) -> dict:
        """What a Spark worker needs to load `model` on this backend (also the worker's cache key)."""
        check_fake_model(self.backend, model)
        spec = {"backend": self.backend, "model": model}
        if self.backend != "fake":
            spec.update(dtype=self.dtype, batch_size=self.batch_size)
        if self.backend == "transformers":
            spec["threads"] = self.torch_threads
        return spec


@dataclass
class GenerationConfig(ModelJobConfig):
    """Settings every job that generates text shares (sl-generate, sample-pairs, label --cot, evaluate)."""
    limit: int | None = opt(None, "at most this many prompts of each kind (first by prompt id)", lo=1)
    splits: list = opt(["train"], "prompt splits to generate for (test is held out for evaluation)",
                       choices=SPLITS)
    batches_per_commit: int = opt(256, "the most batches in one Spark job and Delta commit: bounds what one task holds "
                                       "and what a kill loses when nothing is measured (chunks are sized by "
                                       "chunk_seconds below it)", lo=1, hi=1000)
    chunk_seconds: float = opt(30.0, "model time a chunk of generations aims at, measured on the wave's first "
                                     "batches, so a commit's fixed 1-2 s stays small beside it (0: always "
                                     "batches_per_commit batches)", lo=0.0, hi=3600.0)
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)", **TEMPERATURE)
    top_p: float = opt(0.9, "nucleus sampling mass", gt=0.0, hi=1.0)
    max_attempts: int = opt(2, "attempts per generation before it is left failed (each failure is an event)",
                            lo=1, hi=100)
    max_failed_fraction: float = opt(0.1, "exit 1 when more than this share of the run's model work failed or "
                                          "gave up (what succeeded is still committed); 1 = never", lo=0.0, hi=1.0)


@dataclass
class FeedbackFields:
    """The feedback model and what it judges by (label, eval-labeler)."""
    constitution: str = opt("constitutions/default.yaml", "constitution whose comparison principles judge")
    feedback_model: str = opt("default", "the labelling model: 'default', a model folder or a cached hub id")
    ensemble: int = opt(1, "K comparison principles per pair, averaged (the paper's main setting: 1; at most 16, "
                           "the paper's comparison principles: the constitution must hold K)", lo=1, hi=16)


def writer_lake(cfg, job: str, mode: str = "write"):
    """The lake a job without model work (ingest, gate, promote) writes: delta-spark, the lake's one writer,
    through a local Spark session (under spark-submit or on Databricks, the running one)."""
    from cai_lib.lake.spark_delta import open_lake
    from cai_lib.runtime.session import get_spark
    check_lake_target(cfg.lake, mode)   # a bad target fails before the JVM starts
    return open_lake(cfg.lake, get_spark("local[1]", f"cai-{job}", delta=True), mode=mode)


def reader_of(lake):
    """Where a job reads what its writer lake holds: delta-rs at the same folder for a local lake, the lake
    itself on a cloud URI (delta-rs opens local folders only here). On a stage's fresh JVM each delta-spark
    call (a version, a read) took 1-2 s: a gate's 4 versions and 4 reads were 9-15 s of its ~20 (measured
    2026-12-06, 2-core AVX-512 Xeon); delta-rs reads the same commits in milliseconds. Both read the
    table's log as it is at the call; `AtVersions` pins a read to the versions a job records."""
    return lake if isinstance(lake, Lake) or is_uri(lake.root) else Lake(lake.root)


class AtVersions:
    """`lake` (a Lake or a SparkDeltaLake) whose reads of the tables in `versions` are at those versions, so
    what a job judges is exactly what it records, whatever another job commits meanwhile; every other table
    and method as `lake` has them."""

    def __init__(self, lake, versions: dict[str, int | None]):
        self.lake, self.versions = lake, versions

    def exists(self, name: str) -> bool:
        return self.versions[name] is not None if name in self.versions else self.lake.exists(name)

    def read(self, name: str, columns: list[str] | None = None, version: int | None = None):
        if version is None and name in self.versions and self.versions[name] is None:   # absent when recorded
            return read_schema(name, columns).empty_table()
        return self.lake.read(name, columns, self.versions.get(name) if version is None else version)

    def __getattr__(self, attr: str):
        return getattr(self.lake, attr)


def write_pointer(path: str | None, lake: Lake, tables: list[str], extra: dict | None = None) -> None:
    """A small, deterministic JSON (table -> Delta version, rows) that DVC tracks instead of the lake.
    Versions and counts are read through `reader_of(lake)` (a writer lake's Spark took 1-3 s per table).

    Written to a temp file and renamed, so a crash never leaves half a pointer.
    """
    if not path:
        return
    lake = reader_of(lake)
    write_json(path, {"lake": str(lake.root), "tables": lake.snapshot(tables), **(extra or {})})


class JobFailed(RuntimeError):
    """A job that ran but failed its contract (too many failed model calls, a refused rebuild).
    What it committed stays committed; the CLI prints the message and exits 1."""


@dataclass
class Failures:
    """One kind of model work a run did: how much it tried, failed, and skipped as given up."""
    what: str                        # plural noun: "generations", "responses", "scorings", ...
    attempted: int = 0               # tried in this run
    failed: int = 0                  # of those, failed (each a failed event or a quarantine row)
    gave_up: int = 0                 # skipped: failed max_attempts times in earlier runs
    first_error: str | None = None
    max_attempts: int | None = None  # None: no attempt limit (retried on every run)
    tries: int = 0                   # the most attempts one given-up item has had

    @classmethod
    def of(cls, what: str, stats, gave_up: int = 0, max_attempts: int | None = None, tries: int = 0) -> "Failures":
        """From a RunStats (cai_lib/runtime/tasks.py), or None when nothing ran."""
        return cls(what, stats.tasks if stats else 0, stats.failed if stats else 0, gave_up,
                   stats.first_error if stats else None, max_attempts, tries)

    def undone_fraction(self) -> float:
        return (self.failed + self.gave_up) / max(self.attempted + self.gave_up, 1)

    def describe(self) -> str:
        """`2 of 5 generations failed (first error: ...); 3 generations gave up after 2 attempts: ...`"""
        parts = []
        if self.failed:
            retry = (f"a rerun retries those with attempts left (max_attempts={self.max_attempts})"
                     if self.max_attempts else "a rerun retries them")
            parts.append(f"{self.failed} of {self.attempted} {self.what} failed (first error: {self.first_error}); "
                         f"{retry}")
        if self.gave_up:
            n = max(self.tries, self.max_attempts or 0)
            parts.append(f"{self.gave_up} {self.what} gave up after {n} failed attempts and were skipped: pass "
                         f"--max-attempts {n + 1} to retry them")
        if self.attempted == 0 and self.gave_up:
            parts.append(f"this run did no {self.what}")
        return "; ".join(parts)


def judge(summary: dict, max_failed_fraction: float) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a run's summary: its `failures` over the bound, its refused `errors`."""
    errors, warnings = [], []
    for f in summary.get("failures", []):
        if not (f.failed or f.gave_up):
            continue
        if f.undone_fraction() > max_failed_fraction:
            errors.append(f"{f.describe()} (more than max_failed_fraction={max_failed_fraction} of this run's "
                          f"{f.what}; what succeeded is committed)")
        else:
            warnings.append(f.describe())
    return errors + list(summary.get("errors", [])), warnings + list(summary.get("warnings", []))


def guarded_replace(lake: Lake, name: str, rows, selected: set, allow_shrink: bool, why) -> tuple[bool, list, list]:
    """Rebuild a derived table, unless it would shrink without an explanation: (rewritten, errors, warnings).

    A row may only disappear when these settings no longer select its input (its key is not
    in `selected`: a prompt outside --splits, a pair outside --limit or --policy). A row whose
    input is still selected but that this run could not rebuild (failed, given-up or not yet
    generated work) keeps the old table and is an error; `why(keys)` says why those rows are
    missing. allow_shrink replaces it anyway.
    """
    from cai_lib.lake.tables import spec_of
    key = spec_of(name).key
    old = set(lake.read(name, columns=[key])[key].to_pylist()) if lake.exists(name) else set()
    if rows.num_rows >= len(old):
        return lake.replace(name, rows), [], []
    lost = old - set(rows[key].to_pylist())
    unexplained = lost & selected
    return shrink_verdict(name, len(old), rows.num_rows, len(lost), len(unexplained), allow_shrink,
                          lambda: why(unexplained), lambda: lake.replace(name, rows))


def guarded_replace_df(lake, name: str, rows, selected, allow_shrink: bool, why,
                       built_from: str | None = None) -> tuple[bool, list, list]:
    """`guarded_replace` in Spark (the Spark-native data plane): `rows` and `selected` (the selected
    keys) are DataFrames, `why(unexplained)` gets the unexplained keys as a DataFrame; nothing is collected.
    `built_from` goes to the commit (SparkDeltaLake.replace_df)."""
    from cai_lib.lake.tables import spec_of
    key = spec_of(name).key
    rows = rows.persist()
    new = rows.count()
    old = lake.df(name).select(key) if lake.exists(name) else None
    n_old = old.count() if old is not None else 0
    if new >= n_old:
        return lake.replace_df(name, rows, built_from), [], []
    lost = old.join(rows.select(key), key, "left_anti").persist()
    unexplained = lost.join(selected.select(key), key, "left_semi")
    return shrink_verdict(name, n_old, new, lost.count(), unexplained.count(), allow_shrink,
                          lambda: why(unexplained), lambda: lake.replace_df(name, rows, built_from))


def shrink_verdict(name: str, old: int, new: int, lost: int, unexplained: int, allow_shrink: bool, why,
                   replace) -> tuple[bool, list, list]:
    """The shrink rule of guarded_replace on counts: `why()` explains the unexplained rows, `replace()` writes."""
    if unexplained and not allow_shrink:
        return False, [f"refusing to rebuild {name}: it would shrink from {old} to {new} rows, and "
                       f"{unexplained} of the dropped rows are for inputs these settings still select: "
                       f"{why()}. The old table is kept. Fix: rerun until that work succeeds, or pass "
                       f"--allow-shrink to replace it anyway"], []
    note = (f"{name} shrank from {old} to {new} rows: {lost - unexplained} dropped rows are for "
            f"inputs these settings no longer select"
            + (f", {unexplained} dropped anyway (--allow-shrink): {why()}" if unexplained else ""))
    return replace(), [], [note]


def report(title: str, summary: dict) -> None:
    """One summary line on stdout: `title: key=value, ...` (scripts and tests read it); a job that
    lists its `failures` always shows failed= (and gave_up=), even when its own keys do not."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
             if not isinstance(v, (dict, list))}
    failures = summary.get("failures", [])
    if failures:
        shown.setdefault("failed", sum(f.failed for f in failures))
        shown.setdefault("gave_up", sum(f.gave_up for f in failures))
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    sys.stdout.flush()


def spark_job_main(config_cls, section: str, argv, doc: str, run) -> int:
    """The body of every Spark job's main(): config from params + flags, session, run, summary, verdict.

    The summary line always prints; then each warning (failures within max_failed_fraction, an
    explained shrink) goes to stderr, and any error raises JobFailed (exit 1: `dvc repro` stops).
    """
    from cai_lib.config import load_config
    from cai_lib.runtime.session import get_spark
    cfg = load_config(config_cls, section, argv, doc)
    title = section.replace("_", "-")
    spark = get_spark(cfg.spark_master, f"cai-{title}", delta=True)
    summary = run(spark, cfg, progress=lambda msg: print(msg, flush=True))
    report(title, summary)
    errors, warnings = judge(summary, getattr(cfg, "max_failed_fraction", 1.0))
    for w in warnings:
        print(f"cai {title}: warning: {w}", file=sys.stderr, flush=True)
    if errors:
        raise JobFailed("\n  ".join(errors))
    return 0


@dataclass
class TrainConfig(LakeConfig, SeedConfig, RegistryConfig):
    """What every training job shares: gates to rely on, where the model goes, its registry name.
    A training job also inherits its library settings class (one source of defaults and help)."""
    require_gates: bool = opt(True, "refuse to train on data no passing gate verdict covers")
    work_dir: str | None = opt(None, "scratch folder for the weights before they are registered (default: system temp)")
    model_pointer: str | None = opt(None, "write {name, version, run_id} of the registered model here (for DVC)")
    metrics: str | None = opt(None, "write the run's final metrics JSON here (for dvc metrics)")


def gate_verdicts(lake: Lake, cfg: TrainConfig, needs: dict[str, list[str]]) -> dict[str, dict]:
    """{stage: verdict} for each gate stage whose tables training reads; raises GateNotPassed.
    A labels verdict also carries the labeller's human-agreement figures it judged (`labeller`),
    which the run keeps as a tag: the gate_events row has only the evaluation's sha."""
    from cai_lib.registry.tracking import GateNotPassed, labeller_figures, passing_verdict
    verdicts = {}
    for stage, tables in needs.items():
        try:
            verdicts[stage] = passing_verdict(lake, stage, tables)
        except GateNotPassed:
            if cfg.require_gates:
                raise
            print(f"warning: training without a passing `{stage}` gate (--no-require-gates)", file=sys.stderr)
    if "labels" in verdicts:
        verdicts["labels"]["labeller"] = labeller_figures(verdicts["labels"], labeller_metrics_path(cfg.params))
    return verdicts


def labeller_metrics_path(params_path: str) -> str:
    """Where the labels gate reads the eval-labeler metrics: params [gate] eval_metrics, else where
    eval-labeler writes them (the gate's and eval-labeler's default)."""
    from cai_lib.config import read_params
    params = read_params(params_path)
    return ((params.get("gate") or {}).get("eval_metrics") or (params.get("eval_labeler") or {}).get("metrics")
            or "metrics/eval_labeler.json")


@contextlib.contextmanager
def scratch_model_dir(cfg: TrainConfig):
    """A fresh folder for the trained weights; MLflow keeps the registered copy, this one is removed."""
    if cfg.work_dir:
        Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-train-", dir=cfg.work_dir) as tmp:
        yield Path(tmp) / "model"


def register_trained(cfg: TrainConfig, run, out_dir, kind: str, metrics: dict, extra: dict | None = None,
                     lake: Lake | None = None) -> dict:
    """Log the final metrics, register the weights with their model card (what the version was
    trained on, transitively, and its gate verdicts), write the model pointer and metrics files."""
    import mlflow
    from cai_lib.registry.card import write_card
    from cai_lib.registry.models import register_folder
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    version = register_folder(out_dir, cfg.registered_name, kind)
    write_card(cfg.registered_name, version, lake)
    pointer = {"name": cfg.registered_name, "version": version, "run_id": run.info.run_id, **(extra or {})}
    write_json(cfg.model_pointer, pointer)
    write_json(cfg.metrics, metrics)
    return pointer


def refuse_script_run(command: str) -> int:
    """`python jobs/x.py` or `spark-submit jobs/x.py` puts jobs/ first on sys.path, where the job
    files shadow packages of the same name (jobs/evaluate.py hides Hugging Face `evaluate`)."""
    print(f"run this job as `cai {command} ...`, or on a cluster as `spark-submit launch/cai_task.py {command} ...`, "
          f"not as a file: from jobs/, job files shadow packages of the same name", file=sys.stderr)
    return 2
