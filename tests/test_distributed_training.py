"""Data-parallel training under Spark's TorchDistributor (local mode, gloo, 2 CPU processes) on the
embedded default model: 2 ranks take the same optimizer steps as 1 process with the same global
batch; only rank 0 saves; a failing rank fails the launch with its own error.

Tolerance: the ranks sum the same per-row gradients in another order (two partial sums and an
all-reduce), so the float32 losses of 2 processes match 1 process to 1e-4 (absolute, on losses
of about 2-4 nats); measured differences are about 1e-6.

    python -m pytest -q tests/test_distributed_training.py
"""
from __future__ import annotations

import sys

import pytest

from cai_lib.backends.models import resolve_model
from cai_lib.training.distributed import RankFailed, launch, ranks
from cai_lib.training.sft import SFTSettings, train_sft

TOL = 1e-4
ROWS = [{"key": f"p{i}", "prompt": f"How long do I bake loaf {i}?",
         "response": f"Bake loaf {i} at 220 C for {20 + i} minutes."} for i in range(8)]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("default")


def sft(model_dir, out, processes: int, spark):
    # 8 rows, global batch 4 (2 per rank), 3 steps: every step's rows are split between the ranks
    settings = SFTSettings(max_steps=3, batch_size=4, max_length=64, heldout_fraction=0.25, torch_threads=1,
                           seed=7, learning_rate=1e-4)
    return launch(train_sft, model_dir, ROWS, settings, out, processes=processes)


def test_sft_two_processes_follow_the_one_process_loss_trajectory(model_dir, tmp_path, spark):
    one = sft(model_dir, tmp_path / "one", 1, spark)
    two = sft(model_dir, tmp_path / "two", 2, spark)
    print(f"\nSFT losses 1 process: {one.train_losses}\nSFT losses 2 processes: {two.train_losses}")
    assert len(one.train_losses) == len(two.train_losses) == 3
    assert max(abs(a - b) for a, b in zip(one.train_losses, two.train_losses)) < TOL
    assert abs(one.heldout_loss_after - two.heldout_loss_after) < TOL
    assert (two.n_train, two.n_heldout, two.changed_params) == (one.n_train, one.n_heldout, one.changed_params)
    assert one.train_losses[-1] < one.train_losses[0]   # it trained
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def fail_on_rank_one(value: int) -> int:
    group = ranks()
    if group.rank == 1:
        raise ValueError(f"rank one cannot read shard {value}")
    group.sum_(1.0)   # rank 0 waits in a collective until torchrun stops it
    return value


def test_a_failing_rank_fails_the_launch_with_its_error(spark):
    from pyspark import cloudpickle   # the copy TorchDistributor pickles with
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the ranks do not import tests/
    try:
        with pytest.raises(RankFailed, match=r"^rank 1 of 2 failed: ValueError: rank one cannot read shard 5"):
            launch(fail_on_rank_one, 5, processes=2)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_pm_two_processes_follow_the_one_process_loss_trajectory(tmp_path, spark):
    from cai_lib.training.pm_model import PreferenceModel
    from cai_lib.training.pm_train import PMSettings, train_pm
    from tests.test_pm_train import polite_rows
    # head-only (the default): each rank computes the features of half the sequences, all ranks get
    # all of them; 10 train pairs, global batch 4 (2 per rank), 4 steps: the 3rd step is the short end of an epoch
    # float32 features: in bf16 (what `auto` gives on a CPU with bf16 instructions) a sequence's
    # features change by up to 0.5 with the shape of the batch it is in, so 1 and 2 processes differ there
    settings = PMSettings(epochs=2, max_steps=4, batch_size=4, max_length=64, heldout_fraction=0.25,
                          torch_threads=1, seed=3, backbone_dtype="float32")
    one = launch(train_pm, "default", polite_rows(12), settings, tmp_path / "one", processes=1)
    two = launch(train_pm, "default", polite_rows(12), settings, tmp_path / "two", processes=2)
    print(f"\nPM losses 1 process: {one.train_losses}\nPM losses 2 processes: {two.train_losses}")
    assert len(one.train_losses) == len(two.train_losses) == 4
    assert max(abs(a - b) for a, b in zip(one.train_losses, two.train_losses)) < TOL
    assert abs(one.heldout_loss_after - two.heldout_loss_after) < TOL
    assert two.pm is None and (two.n_train, two.n_heldout) == (one.n_train, one.n_heldout)
    saved = PreferenceModel.load(tmp_path / "two")   # rank 0 saved the head the 2 ranks trained
    assert (saved.head.weight - one.pm.head.weight.cpu()).abs().max().item() < TOL


@pytest.fixture
def by_value():
    """The ranks unpickle this module's functions by value: they do not import tests/."""
    from pyspark import cloudpickle   # the copy TorchDistributor pickles with
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def letter_e(prompts, responses):
    """Toy reward: how often the letter e appears, / 10 (each rank calls its own copy)."""
    return [r.count("e") / 10 for r in responses]


def test_dpo_two_processes_take_the_one_process_steps(tmp_path, spark):
    from tests.test_rl import PAIRS, tiny
    from cai_lib.training.dpo import train_dpo
    settings = tiny(algorithm="dpo", batch_size=4, mini_batch_size=2, dpo_epochs=1, dpo_max_steps=2)
    one = launch(train_dpo, "default", PAIRS * 2, settings, tmp_path / "one", processes=1)
    two = launch(train_dpo, "default", PAIRS * 2, settings, tmp_path / "two", processes=2)
    print(f"\nDPO losses 1 process: {[m['loss'] for m in one.metrics]}\n"
          f"DPO losses 2 processes: {[m['loss'] for m in two.metrics]}")
    for a, b in zip(one.metrics, two.metrics, strict=True):
        assert all(abs(a[k] - b[k]) < TOL for k in ("loss", "margin", "reward_chosen", "accuracy", "pairs")), (a, b)
    assert two.metrics[1]["loss"] != two.metrics[0]["loss"]   # the first update moved the policy
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_ppo_two_processes_update_with_a_reference_per_rank(tmp_path, spark, by_value):
    from tests.test_rl import assert_loadable_and_changed, tiny
    from cai_lib.training.ppo import PPO_METRICS, train_ppo
    prompts = ["Name a fruit.", "Say hello.", "What is 2 + 2?", "Greet a friend."]
    result = launch(train_ppo, "default", prompts, letter_e, tiny(batch_size=4, mini_batch_size=2),
                    tmp_path / "policy", processes=2)
    assert len(result.metrics) == 2
    assert all(set(PPO_METRICS) <= m.keys() for m in result.metrics)
    assert result.metrics[0]["kl_mean"] == 0.0   # each rank's reference is its starting policy
    assert_loadable_and_changed(tmp_path / "policy")   # rank 0 saved the trained policy
    with pytest.raises(ValueError, match="RLSettings.mini_batch_size 3 does not split evenly over 2 processes"):
        launch(train_ppo, "default", prompts, letter_e, tiny(batch_size=4, mini_batch_size=3),
               tmp_path / "odd", processes=2)


def sft_failing_on_rank_one(*args):
    """train_sft whose rank 1 fails reading its shard; rank 0 waits in a collective until stopped."""
    group = ranks()
    if group.rank == 1:
        raise ValueError("rank 1 could not read its shard of sl_dataset")
    group.sum_(1.0)


def test_a_failing_rank_fails_the_job_and_registers_nothing(tmp_path, spark, by_value, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from synthetic_lake import build_clean_lake

    import jobs.train_sl
    from jobs.cli import main as cai
    lake = build_clean_lake(tmp_path / "lake")
    monkeypatch.setattr(jobs.train_sl, "train_sft", sft_failing_on_rank_one)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert cai(["train-sl", "--lake", str(lake.root), "--params", "/dev/null", "--tracking-uri", uri,
                "--artifact-dir", str(tmp_path / "artifacts"), "--num-processes", "2", "--max-steps", "1", "--no-require-gates"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # rank 0, stopped in its all-reduce when rank 1 went away, is named after the cause
    assert err[-1] == ("cai train-sl: error: rank 1 of 2 failed: ValueError: rank 1 could not read its shard of "
                       "sl_dataset (then rank(s) [0] stopped with it); nothing was registered")
    assert MlflowClient(uri).search_model_versions("name='cai-sl'") == []


def test_databricks_training_tasks_run_distributed_on_the_gpu_workers():
    import yaml
    from tests.conftest import ROOT
    tasks = yaml.safe_load((ROOT / "resources/cai_pipeline.job.yml").read_text())["resources"]["jobs"]["cai_pipeline"]["tasks"]
    for t in (t for t in tasks if t["task_key"] in ("train_sl", "train_pm", "train_rl")):
        args = t["spark_python_task"]["parameters"]
        flags = dict(zip(args[1::2], args[2::2]))
        assert (flags["--num-processes"], flags["--distributed"]) == ("${var.gpu_workers}", "cluster"), t["task_key"]
        assert flags["--work-dir"] == "${var.state}/work"


def test_cluster_mode_needs_a_shared_work_dir():
    from jobs.train_sl import TrainSLConfig
    with pytest.raises(ValueError, match="--distributed cluster needs --work-dir on storage every node sees"):
        TrainSLConfig(num_processes=2, distributed="cluster").check_distributed()
    TrainSLConfig(num_processes=2, distributed="cluster", work_dir="/shared/work").check_distributed()
