"""SL-CAI: fine-tune the base model on `sl_dataset` (final revisions + helpful answers), register `cai-sl`.

    cai train-sl --lake lake
    cai train-sl --method lora --epochs 2

Loss on the response tokens only; a deterministic share of prompts is held out and its loss
is reported before and after. Trains only on what the last passing `sl` gate verdict covers,
minus chains a gate quarantined. The MLflow run logs params, per-step loss, the Delta
versions read, the gate verdict, the constitution and git commit; the model (safetensors,
LoRA merged) is registered as `cai-sl`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.config import load_config, opt
from cai_lib.lake import Lake
from cai_lib.sft import SFTSettings, train_sft
from cai_lib.training_data import sl_rows
from jobs.common import TrainConfig, gate_verdicts, register_trained, report, scratch_model_dir


@dataclass
class TrainSLConfig(TrainConfig):
    base_model: str | None = opt(None, "the model to fine-tune (default: [common] model)")
    method: str = opt("full", "full | lora (merged into the weights before saving)")
    learning_rate: float | None = opt(None, "peak learning rate (None: 1e-5 full, 2e-4 LoRA)")
    epochs: float = opt(1.0, "passes over the training rows (when max_steps is not set)")
    max_steps: int | None = opt(None, "optimizer steps (overrides epochs)")
    batch_size: int = opt(4, "rows per forward pass")
    grad_accum: int = opt(1, "forward passes per optimizer step")
    max_length: int = opt(512, "tokens per row (prompt + response); longer responses are cut, reported")
    heldout_fraction: float = opt(0.1, "share of prompts held out for the loss before/after")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    registered_name: str = opt("cai-sl", "MLflow registered model name")

    def settings(self) -> SFTSettings:
        return SFTSettings(method=self.method, learning_rate=self.learning_rate, epochs=self.epochs,
                           max_steps=self.max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           max_length=self.max_length, heldout_fraction=self.heldout_fraction, seed=self.seed,
                           threads=self.torch_threads, lora_r=self.lora_r, lora_alpha=self.lora_alpha)


def run(cfg: TrainSLConfig, progress=print) -> dict:
    from cai_lib.registry import log_step_metrics, model_folder, training_run
    lake = Lake(cfg.lake)
    settings = cfg.settings()  # bad settings fail before anything is read or logged
    verdicts = gate_verdicts(lake, cfg, {"sl": ["sl_dataset"]})
    data = sl_rows(lake)
    if not data.rows:
        raise ValueError(f"{lake.root}/sl_dataset has no trainable rows ({data.excluded} quarantined): "
                         "run `cai sl-generate` (and `cai gate sl`) first")
    shas = sorted({r["constitution_sha"] for r in data.rows})
    base = cfg.base_model or cfg.model
    folder = model_folder(base, cfg)
    with training_run("train-sl", cfg, lake, ["sl_dataset", "quarantine"], verdicts,
                      {"constitution_sha": ",".join(shas), "base_model": base}) as run, \
            scratch_model_dir(cfg) as out_dir:
        progress(f"fine-tuning {base} on {len(data.rows)} SL rows ({data.excluded} quarantined rows left out)")
        result = train_sft(folder, data.rows, settings, out_dir, on_step=log_step_metrics)
        metrics = {"n_train": result.n_train, "n_heldout": result.n_heldout, "n_truncated": result.n_truncated,
                   "n_dropped": len(result.dropped), "rows_quarantined": data.excluded, "steps": result.steps,
                   "heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after,
                   "train_loss_first": result.train_losses[0] if result.train_losses else None,
                   "train_loss_last": result.train_losses[-1] if result.train_losses else None,
                   "changed_params": result.changed_params, "seconds": result.seconds}
        for d in result.dropped:
            print(f"warning: row {d.key} not trained on: {d.reason} ({d.detail})", file=sys.stderr)
        pointer = register_trained(cfg, run, out_dir, "sl", metrics)
    return {**pointer, **metrics}


def main(argv=None) -> int:
    cfg = load_config(TrainSLConfig, "train_sl", argv, __doc__)
    report("train-sl", run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
