"""No load path unpickles weights. The folder below holds a `pytorch_model.bin` whose unpickling would
run a command (it touches a marker file); every path that loads a model must refuse it by name,
before anything reads it: generation and scoring (transformers backend, and the driver-side check
of `cai sl-generate`), SFT, the PM backbone, the PPO/DPO policy and the registry's resolver."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest

from cai_lib.backends.models import resolve_model

REFUSED = r"contains pickle files \['pytorch_model.bin'\]: refusing to load pickle weight files"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def pickled_model(tmp_path):
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    default = resolve_model("default")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default / name).exists():
            shutil.copy(default / name, folder / name)
    marker = tmp_path / "code-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    yield folder
    assert not marker.exists(), "a load path unpickled the weights"


def test_the_transformers_backend_refuses_pickles(pickled_model):
    from cai_lib.backends import load_backend
    with pytest.raises(ValueError, match=REFUSED):
        load_backend("transformers", str(pickled_model))


def test_sl_generate_refuses_before_any_model_call(pickled_model, small_lake, spark, capsys):
    from cai_lib.lake.tables import Lake
    from jobs.cli import main as cai
    before = Lake(small_lake).snapshot()
    assert cai(["sl-generate", "--lake", str(small_lake), "--params", "/nonexistent.yaml", "--base-model",
                str(pickled_model), "--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and str(pickled_model) in err
    assert Lake(small_lake).snapshot() == before


def test_training_and_registry_paths_refuse_pickles(pickled_model):
    from cai_lib.registry.models import resolve_weights
    from cai_lib.training.policy import RLSettings, load_policy
    from cai_lib.training.pm_model import PreferenceModel
    from cai_lib.training.sft import load_safetensors_folder
    with pytest.raises(ValueError, match=REFUSED):
        load_safetensors_folder(pickled_model)            # SFT (train-sl)
    with pytest.raises(ValueError, match=REFUSED):
        PreferenceModel.from_backbone(pickled_model)     # PM backbone (train-pm)
    with pytest.raises(ValueError, match=REFUSED):
        load_policy(pickled_model, RLSettings(), "ppo")  # PPO / DPO policy (train-rl)
    with pytest.raises(ValueError, match=REFUSED):
        resolve_weights(str(pickled_model))              # any job's model flag, registered or not
