"""No load path unpickles weights. The folder below holds a `pytorch_model.bin` whose unpickling would
run a command (it touches a marker file); every path that loads a model must refuse it by name,
before anything reads it: generation and scoring (transformers backend, and the driver-side check
of `cai sl-generate`), SFT, the PM backbone, the PPO/DPO policy and the registry's resolver.

The pure tests further down check the one folder check (`assert_no_pickles`) on tiny fake folders:
the default folder too, pickles by content whatever their name, weight indexes, safetensors headers,
a folder with no safetensors, and a job config that refuses before Spark starts."""
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
    assert cai(["sl-generate", "--lake", str(small_lake), "--params", "/dev/null", "--base-model",
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


# ---------------------------------------------------------------- the folder check itself (pure, no model load)

NO_PICKLES = ("refusing to load pickle weight files, as unpickling can run arbitrary code and we load safetensors "
              "only; convert them to safetensors (load once in a sandbox, then save_pretrained, which writes "
              "safetensors) or remove them")
CONVERT = "(load once in a sandbox, then save_pretrained, which writes safetensors)"


def tiny_model(folder):
    """A model folder's shape, with a real (tiny) safetensors file and config.json: no real weights."""
    import numpy as np
    from safetensors.numpy import save_file
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def refused(folder, message):
    """resolve_model(folder) raises exactly `message`, and so does the check jobs run before Spark."""
    from cai_lib.backends.models import check_model_early
    from cai_lib.backends.weights import UnsafeWeights
    for check in (lambda: resolve_model(str(folder)), lambda: check_model_early("transformers", str(folder))):
        with pytest.raises(UnsafeWeights) as info:
            check()
        assert str(info.value) == message


def test_a_pickle_planted_in_the_default_folder_is_refused(tmp_path, monkeypatch):
    from cai_lib.backends.models import DEFAULT_DIRNAME, check_model_early
    from cai_lib.backends.weights import UnsafeWeights
    monkeypatch.setenv("CAI_MODEL_CACHE", str(tmp_path / "cache"))
    default = tiny_model(tmp_path / "cache" / DEFAULT_DIRNAME)
    assert resolve_model("default") == default      # clean: accepted, not converted again
    (default / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(tmp_path / "code-ran")))
    message = f"model folder {default} contains pickle files ['pytorch_model.bin']: {NO_PICKLES}"
    for check in (lambda: resolve_model("default"), lambda: check_model_early("transformers", "default")):
        with pytest.raises(UnsafeWeights) as info:
            check()
        assert str(info.value) == message
    check_model_early("fake", "fake")                # the fake backend loads no folder


@pytest.mark.parametrize("name, content, kind", [
    ("model.safetensors", "pickle", "pickle data"),
    ("weights.bin2", "pickle", "pickle data"),
    ("weights.dat", "torch", "a torch zip archive"),
])
def test_pickles_are_refused_by_content_whatever_their_name(tmp_path, name, content, kind):
    folder = tiny_model(tmp_path / "m")
    if content == "torch":
        import torch
        torch.save({"w": torch.zeros(2)}, folder / name)   # torch's zip format: archive/data.pkl inside
    else:
        (folder / name).write_bytes(pickle.dumps(_RunsCode(tmp_path / "code-ran")))
    refused(folder, f"model folder {folder} contains pickle files ['{name} ({kind})']: {NO_PICKLES}")


def test_an_index_naming_a_suffixless_shard_is_refused(tmp_path):
    folder = tiny_model(tmp_path / "m")
    (folder / "pytorch_model.bin.index.json").write_text(
        '{"metadata": {}, "weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001"}}')
    refused(folder, f"model folder {folder}: pytorch_model.bin.index.json maps weights to "
                    "['pytorch_model-00001-of-00001'], which are not .safetensors files, so the checkpoint cannot "
                    f"load as safetensors; convert the checkpoint to safetensors {CONVERT} or remove the index")


def test_a_safetensors_file_without_a_safetensors_header_is_refused(tmp_path):
    folder = tiny_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"GGUF" + bytes(60))   # not a pickle, not safetensors either
    refused(folder, f"model folder {folder}: model.safetensors has no safetensors header (an 8-byte header length "
                    f"that fits the file), so it is not safetensors; re-save the weights as safetensors {CONVERT} "
                    "or remove it")


def test_a_folder_without_safetensors_weights_is_refused_up_front(tmp_path):
    folder = tiny_model(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    refused(folder, f"model folder {folder} has no *.safetensors weights and we load safetensors only; convert "
                    f"the checkpoint to safetensors {CONVERT} into this folder")


def test_a_clean_folder_is_accepted(tmp_path):
    from cai_lib.backends.models import check_model_early
    folder = tiny_model(tmp_path / "m")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model.safetensors"}}')
    assert resolve_model(str(folder)) == folder.resolve()
    check_model_early("transformers", str(folder))


def test_a_job_config_refuses_before_spark_starts(tmp_path, monkeypatch, capsys):
    import cai_lib.runtime.session as session
    from jobs.cli import main as cai
    folder = tiny_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(pickle.dumps(_RunsCode(tmp_path / "code-ran")))
    monkeypatch.setattr(session, "get_spark", lambda *a, **k: pytest.fail("Spark started before the model check"))
    assert cai(["sl-generate", "--lake", str(tmp_path / "lake"), "--params", "/dev/null",
                "--base-model", str(folder)]) == 1
    assert capsys.readouterr().err == ("cai sl-generate: error: sl_generate config (read from /dev/null [common] + "
                                       f"[sl_generate], then the flags): model folder {folder} contains pickle files "
                                       f"['model.safetensors (pickle data)']: {NO_PICKLES}\n")


def test_the_real_default_folder_passes_reading_only_headers(monkeypatch):
    """The converted default (`make setup`) passes, and the check reads heads only: well under 1 MiB
    of a 260 MB folder (the safetensors header is tens of kB)."""
    from cai_lib.backends import weights
    from cai_lib.backends.models import default_model_dir
    folder = default_model_dir()
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"no converted default model in {folder} (make setup creates it)")
    asked = []

    class Counted:
        """A file whose reads are recorded: every read must name its size (no read-to-end)."""
        def __init__(self, *args):
            self.f = open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)
    monkeypatch.setattr(weights, "open", Counted, raising=False)
    weights.assert_no_pickles(folder)
    assert asked and all(0 < n for n in asked) and sum(asked) < (1 << 20)
