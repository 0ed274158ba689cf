"""SL-CAI: fine-tune the base model on `sl_dataset` (final revisions + helpful answers), register `cai-sl`.

    cai train-sl --lake lake
    cai train-sl --method lora --epochs 2
    cai train-sl --num-processes 2                  data-parallel on 2 processes (TorchDistributor, gloo on CPU)
    cai train-sl --checkpoint-every 50 --checkpoint-dir checkpoints/sl   killed? the same command resumes

Loss on the response tokens only; a deterministic share of prompts is held out and its loss
is reported before and after. Trains only on what the last passing `sl` gate verdict covers,
minus chains a gate quarantined. The MLflow run logs params, per-step loss, the Delta
versions read, the gate verdict, the constitution and git commit; the model (safetensors,
LoRA merged) is registered as `cai-sl`. The run is tagged with `device` (--device) and
`policy_dtype` (--train-dtype, what the weights train in). With --checkpoint-every N a checkpoint
is written every N steps (cai_lib.training.checkpoint); a run killed mid-way is resumed by the same
command, and the checkpoints are removed once the model is registered (never registered themselves).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.config import load_config, opt, settings_from
from cai_lib.lake.tables import Lake
from cai_lib.training.checkpoint import clear_checkpoints
from cai_lib.training.distributed import DistributedConfig
from cai_lib.training.inputs import sl_rows
from cai_lib.training.policy import resolve_device
from cai_lib.training.sft import SFTSettings, train_sft
from jobs.common import TrainConfig, gate_verdicts, register_trained, report, scratch_model_dir


@dataclass
class TrainSLConfig(TrainConfig, SFTSettings, DistributedConfig):
    """The job's own fields; the fine-tune's settings (and their defaults) are SFTSettings'."""
    FLAG_NEEDS = {k: ("method", ("lora",)) for k in ("lora_r", "lora_alpha", "lora_dropout")}   # full ignores them
    base_model: str = opt("default", "the model to fine-tune: 'default', a model folder, or a registered model")
    registered_name: str = opt("cai-sl", "MLflow registered model name")

    def settings(self) -> SFTSettings:
        return settings_from(self, SFTSettings)


def run(cfg: TrainSLConfig, progress=print) -> dict:
    from cai_lib.registry.lineage import is_registered_ref
    from cai_lib.registry.models import resolve_weights
    from cai_lib.registry.tracking import training_run
    settings = cfg.settings()  # bad settings fail before anything is read or logged
    cfg.check_distributed()
    device = resolve_device(settings.device)   # ... and so does `--device cuda` without a GPU
    lake = Lake(cfg.lake, mode="read")
    verdicts = gate_verdicts(lake, cfg, {"sl": ["sl_dataset"]})
    data = sl_rows(lake)
    if not data.rows:
        raise ValueError(f"{lake.root}/sl_dataset has no trainable rows ({data.excluded} quarantined): "
                         "run `cai sl-generate` (and `cai gate sl`) first")
    shas = sorted({r["constitution_sha"] for r in data.rows})
    base = cfg.base_model
    base_label, folder = resolve_weights(base, cfg)   # "cai-sl/3" for a registered model: a parent
    parent = {"parent.base_model": base_label} if is_registered_ref(base_label) else {}
    with training_run("train-sl", cfg, lake, ["sl_dataset", "quarantine"], verdicts,
                      {"constitution_sha": ",".join(shas), "base_model": base, **parent,
                       "device": str(device), "policy_dtype": settings.train_dtype}) as run, \
            scratch_model_dir(cfg) as out_dir:
        progress(f"fine-tuning {base} on {len(data.rows)} SL rows ({data.excluded} quarantined rows left out) "
                 f"on {device} in {settings.train_dtype}{cfg.describe_processes()}")
        # every rank gets the rows of the pinned version read above and trains on its share of each step
        result = cfg.launch(train_sft, folder, data.rows, settings, out_dir, cfg.step_logger())
        metrics = {"n_train": result.n_train, "n_heldout": result.n_heldout, "n_truncated": result.n_truncated,
                   "n_dropped": len(result.dropped), "rows_quarantined": data.excluded, "steps": result.steps,
                   "heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after,
                   "train_loss_first": result.train_losses[0] if result.train_losses else None,
                   "train_loss_last": result.train_losses[-1] if result.train_losses else None,
                   "changed_params": result.changed_params, "seconds": result.seconds,
                   "resumed_from_step": result.resumed_from_step}
        if result.resumed_from_step:
            progress(f"resumed from the step-{result.resumed_from_step} checkpoint in {settings.checkpoint_dir}")
        for d in result.dropped:
            print(f"warning: row {d.key} not trained on: {d.reason} ({d.detail})", file=sys.stderr)
        pointer = register_trained(cfg, run, out_dir, "sl", metrics, lake=lake)
    if settings.checkpoint_every:   # registered: the next run starts fresh (a killed one resumed above)
        clear_checkpoints(settings.checkpoint_dir)
    return {**pointer, **metrics}


def main(argv=None) -> int:
    cfg = load_config(TrainSLConfig, "train_sl", argv, __doc__)
    report("train-sl", run(cfg))
    return 0


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("train-sl"))
