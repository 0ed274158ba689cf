"""RL-CAI: PPO of the SL-CAI policy against the preference model, KL-penalised; register `cai-rl`.

    cai train-rl --lake lake                        PPO: policy cai-sl, reward cai-pm
    cai train-rl --algorithm dpo                    DPO on preference_dataset (cheaper, offline)
    cai train-rl --policy cai-sl:3 --reward-model cai-pm@champion --kl-mode adaptive
    cai train-rl --num-processes 2                  data-parallel on 2 processes (TorchDistributor)
    cai train-rl --checkpoint-every 20 --checkpoint-dir checkpoints/rl   killed? the same command resumes

PPO: the policy samples answers to red-team and helpful training prompts, the PM scores them,
reward = score - beta * KL(policy || frozen SL-CAI reference) per token, value head, GAE,
clipped objective. Each step logs reward, KL, beta, losses and the Goodhart watch (refusal
and boilerplate rate of the samples) to MLflow. DPO: chosen/rejected from each AI pair's soft
target (weight = its confidence |2p - 1|; exact ties are skipped and counted) and human pairs.
The run is tagged with its parents (the SL and PM versions) and the gates it relied on, and
with where it ran: `device` (--device: the policy, its reference, the value head and the PM all
run there), `policy_dtype` (float32) and, for PPO, `pm_dtype` (what the reward PM computes in).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from cai_lib.backends.weights import dtype_name
from cai_lib.config import load_config, opt, settings_from
from cai_lib.files import write_json
from cai_lib.lake.tables import Lake
from cai_lib.training.checkpoint import clear_checkpoints
from cai_lib.training.dpo import train_dpo
from cai_lib.training.distributed import DistributedConfig
from cai_lib.training.inputs import preference_rows, rl_prompts
from cai_lib.training.policy import POLICY_DTYPE, RLSettings, module_dtype, resolve_device
from cai_lib.training.ppo import PMReward, train_ppo
from jobs.common import TrainConfig, gate_verdicts, register_trained, report, scratch_model_dir


@dataclass
class TrainRLConfig(TrainConfig, RLSettings, DistributedConfig):
    """The job's own fields; the PPO/DPO settings (and their defaults) are RLSettings'."""
    policy: str = opt("cai-sl", "the policy to start from: a registered model (cai-sl = latest) or a folder; "
                                "it is also the frozen KL reference")
    reward_model: str = opt("cai-pm", "PPO: the registered preference model (or a PM folder)")
    registered_name: str = opt("cai-rl", "MLflow registered model name")
    curve: str | None = opt(None, "write the per-step metrics (reward, KL, beta, Goodhart watch) here as JSON")

    def settings(self) -> RLSettings:
        return settings_from(self, RLSettings)


def dpo_pairs(rows: list[dict]) -> tuple[list[dict], int]:
    """{prompt, chosen, rejected, weight} from preference rows; ties (target 0.5) are counted, not used."""
    pairs, ties = [], 0
    for r in rows:
        if r["target"] == 0.5 or r["response_a"] == r["response_b"]:
            ties += 1
            continue
        a_wins = r["target"] > 0.5
        pairs.append({"prompt": r["prompt"], "chosen": r["response_a"] if a_wins else r["response_b"],
                      "rejected": r["response_b"] if a_wins else r["response_a"],
                      "weight": abs(2 * r["target"] - 1)})
    return pairs, ties


def reward_model(pm_dir, device):
    """(reward_fn, pm): the PM loaded onto the policy's device, in eval mode, scoring
    (prompts, responses) -> one float each, as train_ppo wants."""
    from cai_lib.training.pm_train import PreferenceModel
    pm = PreferenceModel.load(pm_dir, device=str(device))
    pm.eval()

    def reward_fn(ps, responses):
        return pm.score_pairs(ps, responses).tolist()
    return reward_fn, pm


def run(cfg: TrainRLConfig, progress=print) -> dict:
    from cai_lib.registry.models import model_version, resolve_weights, run_tag
    from cai_lib.registry.tracking import training_run
    settings = cfg.settings()
    cfg.check_distributed()
    device = resolve_device(settings.device)   # `--device cuda` without a GPU fails before anything is read
    lake = Lake(cfg.lake, mode="read")
    needs = {"sl": ["prompts"]} if cfg.algorithm == "ppo" else {"labels": ["preference_dataset"]}
    verdicts = gate_verdicts(lake, cfg, needs)
    policy_label, policy_dir = resolve_weights(cfg.policy, cfg)  # "cai-sl/3" for a registered model
    parents = {"policy": policy_label}
    tags = {"base_model": cfg.policy, "device": str(device), "policy_dtype": dtype_name(POLICY_DTYPE)}
    if cfg.algorithm == "ppo":
        parents["reward_model"], pm_dir = resolve_weights(cfg.reward_model, cfg)
        if parents["reward_model"] != cfg.reward_model:  # registered: its constitution is the PM run's
            sha = run_tag(model_version(parents["reward_model"].replace("/", ":")), "constitution_sha")
            if sha:
                tags["constitution_sha"] = sha
    tags.update({f"parent.{k}": v for k, v in parents.items()})
    if cfg.algorithm == "ppo":
        data = rl_prompts(lake)
        prompts = [r["text"] for r in data.rows]
        if not prompts:
            raise ValueError(f"{lake.root}/prompts has no training prompts: run `cai ingest` first")
        reward_fn, pm = reward_model(pm_dir, device)
        tags["pm_dtype"] = module_dtype(pm.backbone)
        if cfg.num_processes > 1:   # each rank loads its own PM on its own device
            reward_fn, pm = PMReward(pm_dir, settings.device), None
        tables = ["prompts", "quarantine"]
    else:
        data = preference_rows(lake)
        pairs, ties = dpo_pairs(data.rows)
        tags["constitution_sha"] = ",".join(sorted({r["constitution_sha"] for r in data.rows if r["constitution_sha"]}))
        if not pairs:
            raise ValueError(f"{lake.root}/preference_dataset has no usable pairs ({ties} ties): run `cai label` first")
        tables = ["preference_dataset", "label_events", "quarantine"]
    with training_run("train-rl", cfg, lake, tables, verdicts, tags) as run, scratch_model_dir(cfg) as out_dir:
        if cfg.algorithm == "ppo":
            progress(f"PPO: {settings.steps} iterations x {settings.batch_size} of {len(prompts)} prompts "
                     f"({data.excluded} quarantined), policy {parents['policy']}, reward {parents.get('reward_model')}"
                     f" (on {device}: policy {tags['policy_dtype']}, PM {tags['pm_dtype']})")
            result = cfg.launch(train_ppo, policy_dir, prompts, reward_fn, settings, out_dir, _logged(cfg, progress))
        else:
            progress(f"DPO on {len(pairs)} pairs ({ties} ties skipped, {data.excluded} quarantined) on {device}"
                     f"{cfg.describe_processes()}")
            result = cfg.launch(train_dpo, policy_dir, pairs, settings, out_dir, _logged(cfg, progress))
        if result.resumed_from_step:
            progress(f"resumed from the step-{result.resumed_from_step} checkpoint in {settings.checkpoint_dir}")
        steps = result.metrics
        keys = ("reward_mean", "kl_mean", "beta", "refusal_rate", "boilerplate_rate", "loss", "margin", "accuracy")
        summary = {"algorithm": cfg.algorithm, "steps": len(steps), "seconds": round(result.seconds, 1),
                   "resumed_from_step": result.resumed_from_step,
                   **{f"first_{k}": steps[0][k] for k in keys if k in steps[0]},
                   **{f"last_{k}": steps[-1][k] for k in keys if k in steps[-1]}}
        pointer = register_trained(cfg, run, out_dir, "rl", summary, {"parents": parents}, lake=lake)
    if settings.checkpoint_every:   # registered: the next run starts fresh (a killed one resumed above)
        clear_checkpoints(settings.checkpoint_dir)
    write_json(cfg.curve, [{"step": i, **m} for i, m in enumerate(steps)])
    return {k: v for k, v in {**pointer, **summary}.items() if not isinstance(v, dict)}


def _logged(cfg: TrainRLConfig, progress):
    """on_step: MLflow (rank 0 into the driver's run when distributed) and a progress line; the ranks
    print to the job's output through torchrun."""
    log = cfg.step_logger()
    progress = progress if cfg.num_processes == 1 else print

    def on_step(step, metrics):
        log(step, metrics)
        progress(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                              if isinstance(v, float) and k != "seconds"))
    return on_step


def main(argv=None) -> int:
    cfg = load_config(TrainRLConfig, "train_rl", argv, __doc__)
    report("train-rl", run(cfg))
    return 0


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("train-rl"))
