"""What every job shares: pointer files for DVC, a printed summary, exit codes for the CLI."""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cai_lib.config import CommonConfig, opt
from cai_lib.lake import Lake


@dataclass
class GenerationConfig(CommonConfig):
    """Settings every generation job shares (sl-generate, sample-pairs, label --cot)."""
    limit: int | None = opt(None, "at most this many prompts of each kind (first by prompt id)")
    splits: list = opt(["train"], "prompt splits to generate for (test is held out for evaluation)")
    batch_size: int = opt(16, "sequences per model call; a batch is also the unit of resume")
    batches_per_commit: int = opt(4, "batches per Spark job and Delta commit (smaller = finer resume)")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.9, "nucleus sampling mass")
    max_attempts: int = opt(2, "attempts per generation before it is left failed (each failure is an event)")

    def __post_init__(self):
        for name in ("batch_size", "batches_per_commit", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    def backend_spec(self) -> dict:
        """What a Spark worker needs to load the same backend (also the worker's cache key)."""
        spec = {"backend": self.backend, "model": self.model}
        if self.backend != "fake":
            spec.update(dtype=self.dtype, batch_size=self.batch_size)
        if self.backend == "transformers":
            spec["threads"] = self.torch_threads
        return spec


def write_pointer(path: str | None, lake: Lake, tables: list[str], extra: dict | None = None) -> None:
    """A small, deterministic JSON (table -> Delta version, rows) that DVC tracks instead of the lake.

    Written to a temp file and renamed, so a crash never leaves half a pointer.
    """
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"lake": str(lake.root), "tables": lake.snapshot(tables), **(extra or {})}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)


def report(title: str, summary: dict) -> None:
    """One summary line on stdout: `title: key=value, ...` (scripts and tests read it)."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
             if not isinstance(v, (dict, list))}
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    sys.stdout.flush()


def spark_job_main(config_cls, section: str, argv, doc: str, run) -> int:
    """The body of every Spark job's main(): config from params + flags, session, run, summary."""
    from cai_lib.config import load_config
    from cai_lib.spark import get_spark
    cfg = load_config(config_cls, section, argv, doc)
    title = section.replace("_", "-")
    summary = run(get_spark(cfg.spark_master, f"cai-{title}"), cfg, progress=lambda msg: print(msg, flush=True))
    report(title, summary)
    return 0


@dataclass
class FeedbackConfig(GenerationConfig):
    """Settings of the jobs that ask a feedback model to compare responses (label, eval-labeler)."""
    constitution: str = opt("constitutions/default.yaml", "constitution whose comparison principles judge")
    feedback_model: str | None = opt(None, "the labelling model (default: [common] model)")
    ensemble: int = opt(1, "K comparison principles per pair, averaged (the paper's main setting: 1)")

    def backend_spec(self) -> dict:
        return {**super().backend_spec(), "model": self.feedback_model or self.model}


@dataclass
class TrainConfig(CommonConfig):
    """What every training job shares: gates to rely on, where the model goes, its registry name."""
    require_gates: bool = opt(True, "refuse to train on data no passing gate verdict covers")
    work_dir: str | None = opt(None, "scratch folder for the weights before they are registered (default: system temp)")
    model_pointer: str | None = opt(None, "write {name, version, run_id} of the registered model here (for DVC)")
    metrics: str | None = opt(None, "write the run's final metrics JSON here (for dvc metrics)")


def gate_verdicts(lake: Lake, cfg: TrainConfig, needs: dict[str, list[str]]) -> dict[str, dict]:
    """{stage: verdict} for each gate stage whose tables training reads; raises GateNotPassed."""
    from cai_lib.registry import GateNotPassed, passing_verdict
    verdicts = {}
    for stage, tables in needs.items():
        try:
            verdicts[stage] = passing_verdict(lake, stage, tables)
        except GateNotPassed:
            if cfg.require_gates:
                raise
            print(f"warning: training without a passing `{stage}` gate (--no-require-gates)", file=sys.stderr)
    return verdicts


@contextlib.contextmanager
def scratch_model_dir(cfg: TrainConfig):
    """A fresh folder for the trained weights; MLflow keeps the registered copy, this one is removed."""
    if cfg.work_dir:
        Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-train-", dir=cfg.work_dir) as tmp:
        yield Path(tmp) / "model"


def register_trained(cfg: TrainConfig, run, out_dir, kind: str, metrics: dict, extra: dict | None = None) -> dict:
    """Log the final metrics, register the weights, write the model pointer and metrics files."""
    import mlflow

    from cai_lib.registry import register_folder
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    version = register_folder(out_dir, cfg.registered_name, kind)
    pointer = {"name": cfg.registered_name, "version": version, "run_id": run.info.run_id, **(extra or {})}
    write_json(cfg.model_pointer, pointer)
    write_json(cfg.metrics, metrics)
    return pointer


def write_json(path: str | None, body: dict) -> None:
    """Atomically write a small JSON file (model pointer, metrics) for DVC."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(out)
