"""Train the preference model (PM) on `preference_dataset`, evaluate it on human pairs, register `cai-pm`.

    cai train-pm --lake lake
    cai train-pm --train-backbone --max-steps 200 --eval-limit 500
    cai train-pm --num-processes 2                  data-parallel on 2 processes (TorchDistributor)
    cai train-pm --train-backbone --checkpoint-every 50 --checkpoint-dir checkpoints/pm   killed? run it again

A backbone (the base model) + a scalar head; loss = binary cross-entropy of
sigmoid(r_A - r_B) against the soft AI harmlessness label p_A (hard 0/1 for human pairs).
Trains only on what the last passing `labels` gate verdict covers (minus quarantined pairs),
then reports accuracy and calibration on held-out human HH-RLHF harmless and helpful pairs.
The MLflow run logs params, per-step loss, the Delta versions read, the gate verdict,
the constitution and git commit; the model (safetensors) is registered as `cai-pm`. The run
is tagged with `device` (--device) and `pm_dtype` (what the trained PM's backbone computes in).
With --checkpoint-every N a checkpoint is written every N steps (cai_lib.training.checkpoint); the
same command resumes a killed run, and the checkpoints are removed once the PM is registered.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cai_lib.config import load_config, opt, settings_from
from cai_lib.ids import normalise_text
from cai_lib.lake.queries import training_prompt_texts
from cai_lib.lake.tables import Lake
from cai_lib.sources.eval_data import read_disjoint_pairs
from cai_lib.training.checkpoint import clear_checkpoints
from cai_lib.training.distributed import DistributedConfig
from cai_lib.training.inputs import preference_rows
from cai_lib.training.pm_train import PMSettings, PreferenceModel, evaluate_pm, train_pm
from cai_lib.training.policy import module_dtype, resolve_device
from jobs.common import TrainConfig, gate_verdicts, register_trained, report, scratch_model_dir


@dataclass
class TrainPMConfig(TrainConfig, PMSettings, DistributedConfig):
    """The job's own fields; the PM training settings (and their defaults) are PMSettings'."""
    base_model: str = opt("default", "the backbone: 'default', a model folder, or a registered model")
    eval_harmless: str | None = opt(None, "HH-RLHF harmless pairs (jsonl/.gz) to report PM accuracy on")
    eval_helpful: str | None = opt(None, "HH-RLHF helpful pairs (jsonl/.gz) to report PM accuracy on")
    eval_limit: int = opt(100, "pairs drawn (seeded) from each evaluation file", lo=1)
    registered_name: str = opt("cai-pm", "MLflow registered model name")

    def settings(self) -> PMSettings:
        return settings_from(self, PMSettings)


def run(cfg: TrainPMConfig, progress=print) -> dict:
    import mlflow
    from cai_lib.registry.lineage import is_registered_ref
    from cai_lib.registry.models import resolve_weights
    from cai_lib.registry.tracking import training_run
    settings = cfg.settings()  # bad settings fail before anything is read or logged
    cfg.check_distributed()
    device = resolve_device(settings.device)   # ... and so does `--device cuda` without a GPU
    lake = Lake(cfg.lake, mode="read")
    verdicts = gate_verdicts(lake, cfg, {"labels": ["preference_dataset"]})
    data = preference_rows(lake)
    if not data.rows:
        raise ValueError(f"{lake.root}/preference_dataset has no trainable pairs ({data.excluded} quarantined): "
                         "run `cai label` (and `cai gate labels`) first")
    shas = sorted({r["constitution_sha"] for r in data.rows if r["constitution_sha"]})
    base = cfg.base_model
    base_label, folder = resolve_weights(base, cfg)   # "cai-sl/3" for a registered model: a parent
    parent = {"parent.base_model": base_label} if is_registered_ref(base_label) else {}
    with training_run("train-pm", cfg, lake, ["preference_dataset", "label_events", "quarantine"], verdicts,
                      {"constitution_sha": ",".join(shas), "base_model": base, **parent,
                       "device": str(device)}) as run, \
            scratch_model_dir(cfg) as out_dir:
        progress(f"training the PM on {len(data.rows)} pairs ({data.excluded} quarantined pairs left out) on {device}"
                 f"{cfg.describe_processes()}")
        result = cfg.launch(train_pm, folder, data.rows, settings, out_dir, cfg.step_logger())
        if result.resumed_from_step:
            progress(f"resumed from the step-{result.resumed_from_step} checkpoint in {settings.checkpoint_dir}")
        # distributed: rank 0 saved it and returned no in-memory model
        pm = result.pm if result.pm is not None else PreferenceModel.load(out_dir, device=str(device))
        mlflow.set_tag("pm_dtype", module_dtype(pm.backbone))   # the dtype train_pm chose for the device
        metrics = {**result.metrics(), "pairs_quarantined": data.excluded,
                   "pairs_ai": sum(r["source"] == "ai_harmless" for r in data.rows),
                   "pairs_human": sum(r["source"] == "human_helpful" for r in data.rows)}
        # never evaluate on a prompt the lake or the PM trained on: a disjoint, seeded sample
        trained = set(training_prompt_texts(lake)) | {normalise_text(r["prompt"]) for r in data.rows}
        for name, path in (("harmless", cfg.eval_harmless), ("helpful", cfg.eval_helpful)):
            if path:
                pairs, rejected, excluded = read_disjoint_pairs(path, limit=cfg.eval_limit, seed=cfg.seed,
                                                                exclude=trained)
                metrics[f"{name}_excluded_training_prompts"] = excluded
                ev = evaluate_pm(pm, pairs, batch_size=cfg.batch_size)
                metrics.update({f"{name}_{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
                metrics[f"{name}_rejected_by_reader"] = len(rejected)
                mlflow.set_tag(f"eval.{name}", str(Path(path)))
        pointer = register_trained(cfg, run, out_dir, "pm", metrics, lake=lake)
    if settings.checkpoint_every:   # registered: the next run starts fresh (a killed one resumed above)
        clear_checkpoints(settings.checkpoint_dir)
    return {**pointer, **{k: v for k, v in metrics.items() if not k.startswith(("n_zero",))}}


def main(argv=None) -> int:
    cfg = load_config(TrainPMConfig, "train_pm", argv, __doc__)
    report("train-pm", run(cfg))
    return 0


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("train-pm"))
