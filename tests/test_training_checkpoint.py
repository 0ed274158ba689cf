"""Step checkpoints (cai_lib.training.checkpoint): a killed SFT or PM training resumes to the same weights.

On the tiny random Llama and in-process BPE tokenizer of bench/gpu_check.py (a few seconds a test):
- a run stopped after step 5 (checkpoints every 2 steps) and started again continues from step 4 and
  ends with exactly the weights and loss trajectory of a run never stopped (CPU fp32, one thread:
  max abs diff 0, asserted with torch.equal), for SFT with LoRA (its dropout draws from the restored
  RNG), for the PM with its backbone training, for DPO and for PPO (metrics compared without their
  wall-clock `seconds`); a 2-rank SFT run (slow: TorchDistributor) does the same, every rank's RNG
  restored;
- a real kill: SFT in a subprocess is SIGKILLed once its step-2 checkpoint has landed (the test polls
  for the file; the child is parked in step 3 so the kill always falls mid-run), the same command
  again resumes from step 2 and ends with the uninterrupted run's weights (max abs diff <= 1e-6);
- a checkpoint of other settings or other rows is refused with an error naming it and the fix;
- the job (slow: a lake and MLflow): `cai train-sl` dying in step 2 registers nothing and keeps its
  step-1 checkpoint; the same command resumes from it, registers version 1 and removes the checkpoints.

    python -m pytest -q tests/test_training_checkpoint.py
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai_lib.training.checkpoint import CheckpointMismatch, clear_checkpoints, latest_checkpoint
from cai_lib.training.dpo import train_dpo
from cai_lib.training.policy import RLSettings
from cai_lib.training.ppo import train_ppo
from cai_lib.training.pm_train import PMSettings, train_pm
from cai_lib.training.sft import SFTSettings, train_sft

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _gpu_check():
    """bench/gpu_check.py as a module (bench/ is not a package), loaded once (as tests/test_gpu_env.py does)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench/gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    _gpu_check().tiny_model_folder(folder, seed=0)
    return folder


def sft_rows(n: int = 8) -> list[dict]:
    texts = _gpu_check().texts
    return [{"key": f"k{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(zip(texts(n), texts(n, 1)))]


def pm_rows(n: int = 8) -> list[dict]:
    texts = _gpu_check().texts
    return [{"pair_id": f"p{i}", "prompt": p, "response_a": r, "response_b": r[::-1], "target": 0.8,
             "source": "ai_harmless"} for i, (p, r) in enumerate(zip(texts(n), texts(n, 2)))]


def sft_settings(**kw) -> SFTSettings:
    return SFTSettings(**{"method": "lora", "lora_dropout": 0.1, "max_steps": STEPS, "batch_size": 2,
                          "max_length": 64, "heldout_fraction": 0.0, "learning_rate": 1e-2, "seed": 3,
                          "torch_threads": 1, **kw})


def pm_settings(**kw) -> PMSettings:
    return PMSettings(**{"train_backbone": True, "epochs": 2, "max_steps": STEPS, "batch_size": 2, "max_length": 64,
                         "heldout_fraction": 0.0, "learning_rate": 1e-3, "head_learning_rate": 1e-2, "seed": 3,
                         "torch_threads": 1, **kw})


class Stop(RuntimeError):
    """Raised from on_step: the run dies after that step's update, before its checkpoint."""


def stop_at(step: int):
    def on_step(n, metrics):
        if n == step:
            raise Stop(f"stopped at step {n}")
    return on_step


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------- resume = uninterrupted

def test_sft_resumed_from_step_4_ends_with_the_uninterrupted_weights_and_losses(tiny, tmp_path):
    whole = train_sft(tiny, sft_rows(), sft_settings(), tmp_path / "whole")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Stop):
        train_sft(tiny, sft_rows(), sft_settings(checkpoint_every=2, checkpoint_dir=str(ckpt)), tmp_path / "cut",
                  on_step=stop_at(5))
    assert [p.name for p in ckpt.iterdir()] == ["step-00000004"]   # older steps dropped, step 5 never saved
    assert not (tmp_path / "cut").exists()
    seen = []
    resumed = train_sft(tiny, sft_rows(), sft_settings(checkpoint_every=2, checkpoint_dir=str(ckpt)),
                        tmp_path / "cut", on_step=lambda n, m: seen.append(n))
    assert resumed.resumed_from_step == 4 and whole.resumed_from_step == 0
    assert seen == [5, 6]                       # only the steps this run took are logged
    assert resumed.train_losses == whole.train_losses and len(whole.train_losses) == STEPS
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert max_abs_diff(a, b) == 0.0 and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000006"]
    assert clear_checkpoints(ckpt) == 1 and not ckpt.exists()


def test_pm_resumed_from_step_4_ends_with_the_uninterrupted_weights_and_losses(tiny, tmp_path):
    whole = train_pm(tiny, pm_rows(), pm_settings(), tmp_path / "whole")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Stop):
        train_pm(tiny, pm_rows(), pm_settings(checkpoint_every=2, checkpoint_dir=str(ckpt)), tmp_path / "cut",
                 on_step=stop_at(5))
    resumed = train_pm(tiny, pm_rows(), pm_settings(checkpoint_every=2, checkpoint_dir=str(ckpt)), tmp_path / "cut")
    assert resumed.resumed_from_step == 4
    assert resumed.train_losses == whole.train_losses and len(whole.train_losses) == STEPS
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert any(k.startswith("score_head") for k in a) and any(k.startswith("model") for k in a)
    assert max_abs_diff(a, b) == 0.0


def test_dpo_resumed_from_step_4_ends_with_the_uninterrupted_weights_and_metrics(tiny, tmp_path):
    """DPO's reference log-probs are the starting policy's: the resumed run computes them again before
    loading the checkpoint, so its steps 5 and 6 see the same reference as the run never stopped."""
    pairs = [{"prompt": p, "chosen": c, "rejected": c[::-1], "weight": 0.5 + i / 10}
             for i, (p, c) in enumerate(zip(_gpu_check().texts(8), _gpu_check().texts(8, 1)))]
    base = {"algorithm": "dpo", "batch_size": 2, "mini_batch_size": 2, "dpo_epochs": 2, "dpo_max_steps": STEPS,
            "max_length": 64, "learning_rate": 1e-3, "seed": 3, "torch_threads": 1}
    on = RLSettings(**base, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"))
    whole = train_dpo(tiny, pairs, RLSettings(**base), tmp_path / "whole")

    def stop(step, metrics):   # DPO counts its steps from 0: step 4 is the fifth
        if step == 4:
            raise Stop("stopped in the fifth step")
    with pytest.raises(Stop):
        train_dpo(tiny, pairs, on, tmp_path / "cut", on_step=stop)
    resumed = train_dpo(tiny, pairs, on, tmp_path / "cut")
    assert resumed.resumed_from_step == 4 and len(whole.metrics) == STEPS

    def untimed(ms):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert untimed(resumed.metrics) == untimed(whole.metrics)
    assert max_abs_diff(weights(tmp_path / "whole"), weights(tmp_path / "cut")) == 0.0


def reply_length(prompts, responses):   # a deterministic reward: PPO needs no PM to be checked
    return [float(len(r)) for r in responses]


def test_ppo_resumed_from_iteration_4_ends_with_the_uninterrupted_weights_and_metrics(tiny, tmp_path):
    """PPO also keeps the value head, the adaptive KL coefficient and the minibatch-order generator;
    the rollout seeds are a function of the iteration, the reference is the starting policy."""
    base = {"algorithm": "ppo", "steps": STEPS, "batch_size": 2, "mini_batch_size": 1, "ppo_epochs": 2,
            "max_new_tokens": 6, "learning_rate": 1e-3, "kl_mode": "adaptive", "kl_horizon": 10.0,
            "seed": 3, "torch_threads": 1}
    on = RLSettings(**base, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"))
    prompts = _gpu_check().texts(4)
    whole = train_ppo(tiny, prompts, reply_length, RLSettings(**base), tmp_path / "whole")

    def stop(step, metrics):   # PPO counts its iterations from 0: step 4 is the fifth
        if step == 4:
            raise Stop("stopped in the fifth iteration")
    with pytest.raises(Stop):
        train_ppo(tiny, prompts, reply_length, on, tmp_path / "cut", on_step=stop)
    resumed = train_ppo(tiny, prompts, reply_length, on, tmp_path / "cut")
    assert resumed.resumed_from_step == 4 and len(whole.metrics) == STEPS

    def untimed(ms):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert untimed(resumed.metrics) == untimed(whole.metrics)
    assert len({m["beta"] for m in whole.metrics}) > 1   # the adaptive beta moved: its restore is checked
    assert max_abs_diff(weights(tmp_path / "whole"), weights(tmp_path / "cut")) == 0.0


# ---------------------------------------------------------------- a real kill

CHILD = """
import json, sys, threading
sys.path[:0] = [{root!r}]
from cai_lib.training.sft import SFTSettings, train_sft
rows, settings, out, park = json.loads(sys.argv[1]), SFTSettings(**json.loads(sys.argv[2])), sys.argv[3], sys.argv[4]
def on_step(n, metrics):   # parked in step 3 (after the step-2 checkpoint): the kill always lands mid-run
    if park == "park" and n == 3:
        threading.Event().wait()
r = train_sft({model!r}, rows, settings, out, on_step=on_step)
print(json.dumps({{"resumed_from_step": r.resumed_from_step, "losses": r.train_losses}}))
"""


def _child(tiny, settings: dict, out: Path, park: str) -> subprocess.Popen:
    code = CHILD.format(root=str(ROOT), model=str(tiny))
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(sft_rows()), json.dumps(settings), str(out), park],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sft_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    kw = {"method": "full", "max_steps": STEPS, "batch_size": 2, "max_length": 64, "heldout_fraction": 0.0,
          "learning_rate": 1e-3, "seed": 5, "torch_threads": 1, "checkpoint_every": 2, "checkpoint_dir": str(ckpt)}
    child = _child(tiny, kw, tmp_path / "out", "park")
    landed = ckpt / "step-00000002" / "checkpoint.json"
    deadline = time.monotonic() + 180   # a bound on a broken child, not a wait for the kill
    while not landed.exists():
        assert child.poll() is None, f"the child died before its first checkpoint: {child.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert latest_checkpoint(ckpt) == ckpt / "step-00000002" and not (tmp_path / "out").exists()

    again = _child(tiny, kw, tmp_path / "out", "run")    # the same command, not parked
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    whole = train_sft(tiny, sft_rows(), SFTSettings(**{**kw, "checkpoint_every": 0}), tmp_path / "whole")
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole.train_losses, abs=1e-6)
    assert max_abs_diff(weights(tmp_path / "out"), weights(tmp_path / "whole")) <= 1e-6


# ---------------------------------------------------------------- refusals

def test_a_checkpoint_of_other_settings_or_rows_is_refused_by_name(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    on = {"checkpoint_every": 2, "checkpoint_dir": str(ckpt)}
    with pytest.raises(Stop):
        train_sft(tiny, sft_rows(), sft_settings(**on), tmp_path / "a", on_step=stop_at(3))
    with pytest.raises(CheckpointMismatch) as e:
        train_sft(tiny, sft_rows(), sft_settings(learning_rate=2e-2, **on), tmp_path / "b")
    assert str(e.value) == (f"checkpoint {ckpt / 'step-00000002'} was written by another run (learning_rate 0.01 -> "
                            f"0.02): it cannot continue this one. Fix: pass a fresh --checkpoint-dir for this run, "
                            f"or delete {ckpt} to start over")
    with pytest.raises(CheckpointMismatch, match=r"\(n_rows 8 -> 7; rows_sha256 differs\)"):
        train_sft(tiny, sft_rows(7), sft_settings(**on), tmp_path / "c")
    with pytest.raises(CheckpointMismatch, match=r"\(kind 'sft' -> 'pm'; n_rows 8 -> 4; rows_sha256 differs; .*"
                                                 r"learning_rate 0.01 -> 0.001"):
        train_pm(tiny, pm_rows(4), pm_settings(**on), tmp_path / "d")
    assert latest_checkpoint(ckpt) == ckpt / "step-00000002"   # refused, never discarded


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / "checkpoint.json").write_text("{}")
    (tmp_path / ".step-00000004.tmp").mkdir()                 # killed while writing step 4
    (tmp_path / ".step-00000004.tmp" / "checkpoint.json").write_text("{}")
    (tmp_path / "step-00000006").mkdir()                      # no checkpoint.json: not one of ours
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert latest_checkpoint(tmp_path / "absent") is None and latest_checkpoint(None) is None


def test_checkpoint_every_needs_a_folder():
    with pytest.raises(ValueError, match="SFTSettings.checkpoint_every is 5 but checkpoint_dir is not set"):
        SFTSettings(checkpoint_every=5)
    with pytest.raises(ValueError, match="PMSettings.checkpoint_every is 5 but checkpoint_dir is not set"):
        PMSettings(checkpoint_every=5, checkpoint_dir=" ")
    with pytest.raises(ValueError, match="below the minimum 0"):
        PMSettings(checkpoint_every=-1)


# ---------------------------------------------------------------- two ranks (TorchDistributor, gloo)

def stop_after_step_5(n, metrics):   # module level: the ranks unpickle it (by value, see below)
    if n == 5:
        raise Stop("stopped at step 5")


def whole_then_resumed(tiny, rows, whole_dir, cut_dir, on):
    """On each rank: an uninterrupted run, then the killed run's resume (one torchrun launch for both)."""
    return train_sft(tiny, rows, sft_settings(), whole_dir), train_sft(tiny, rows, on, cut_dir)


@pytest.mark.slow
def test_two_ranks_resume_to_the_uninterrupted_two_rank_weights(tiny, tmp_path, spark):
    """Rank 0 writes every rank's RNG state (LoRA dropout draws differ per rank); both ranks restore theirs."""
    from pyspark import cloudpickle   # the copy TorchDistributor pickles with

    from cai_lib.training.distributed import RankFailed, launch
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the ranks do not import tests/
    ckpt = tmp_path / "ckpt"
    on = sft_settings(checkpoint_every=2, checkpoint_dir=str(ckpt))
    with pytest.raises(RankFailed, match="rank 0 of 2 failed: Stop: stopped at step 5"):
        launch(train_sft, tiny, sft_rows(), on, tmp_path / "cut", stop_after_step_5, processes=2)
    meta = json.loads((latest_checkpoint(ckpt) / "checkpoint.json").read_text())
    assert meta["step"] == 4 and len(meta["rng"]) == 2 and meta["rng"][0]["torch"] != meta["rng"][1]["torch"]
    whole, resumed = launch(whole_then_resumed, tiny, sft_rows(), tmp_path / "whole", tmp_path / "cut", on,
                            processes=2)
    assert resumed.resumed_from_step == 4 and resumed.train_losses == whole.train_losses
    assert max_abs_diff(weights(tmp_path / "whole"), weights(tmp_path / "cut")) == 0.0
    with pytest.raises(CheckpointMismatch, match=r"checkpoint .*step-00000006 was written by another run "
                                                 r"\(ranks 2 -> 1\)"):
        train_sft(tiny, sft_rows(), on, tmp_path / "one")


# ---------------------------------------------------------------- the job: nothing half-trained is registered

class Killed(RuntimeError):
    """Not a ValueError: the job's error handler does not turn it into exit 1, it ends the job like a crash."""


@pytest.mark.slow
def test_a_train_sl_job_stopped_mid_run_registers_nothing_and_the_rerun_resumes(tiny, tmp_path, monkeypatch, capsys,
                                                                              spark):
    from synthetic_lake import build_clean_lake

    from mlflow.tracking import MlflowClient

    from cai_lib.training.distributed import DistributedConfig
    from jobs.cli import main as cai
    lake = build_clean_lake(tmp_path / "lake")
    (tmp_path / "params.yaml").write_text("{}\n")
    ckpt = tmp_path / "ckpt"
    argv = ["train-sl", "--lake", str(lake.root), "--params", str(tmp_path / "params.yaml"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifact-dir", str(tmp_path / "artifacts"),
            "--base-model", str(tiny), "--torch-threads", "1", "--max-steps", "3", "--batch-size", "2",
            "--max-length", "512", "--checkpoint-every", "1", "--checkpoint-dir", str(ckpt),
            "--metrics", str(tmp_path / "metrics.json"), "--no-require-gates"]   # the gates are tested elsewhere
    logger = DistributedConfig.step_logger

    def dies_in_step_2(self):
        log = logger(self)

        def on_step(step, metrics):
            log(step, metrics)
            if step == 2:
                raise Killed("the job died in step 2")
        return on_step
    monkeypatch.setattr(DistributedConfig, "step_logger", dies_in_step_2)
    with pytest.raises(Killed, match="the job died in step 2"):
        cai(argv)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_model_versions("name='cai-sl'") == []          # nothing registered
    assert latest_checkpoint(ckpt) == ckpt / "step-00000001"
    monkeypatch.setattr(DistributedConfig, "step_logger", logger)
    assert cai(argv) == 0
    assert "resumed from the step-1 checkpoint" in capsys.readouterr().out
    assert [int(v.version) for v in client.search_model_versions("name='cai-sl'")] == [1]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["resumed_from_step"], metrics["steps"]) == (1, 3)
    assert not ckpt.exists()   # registered: the checkpoints are gone
