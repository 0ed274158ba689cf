"""SL-CAI fine-tune on the real default model (SmolLM2-135M, CPU): label masking by hand,
the held-out split, dropped rows, a 2-step full and a 2-step LoRA run (one each, shared by
the tests below), and the refusal of pickled weights.

    python -m pytest -q tests/test_sft.py cai_lib/training/sft.py
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from cai_lib.backends.models import resolve_model
from cai_lib.backends.weights import assert_no_pickles
from cai_lib.ids import is_heldout, split_heldout
from cai_lib.training.sft import SFT_SALT, SFTSettings, load_safetensors_folder, train_sft
from jobs.ingest import split_of
from cai_lib.training.sft_examples import IGNORE, build_examples

# Short rows keep a full-model step to a few seconds on 2 busy cores. Keys were chosen so that
# heldout_fraction=0.5 (SFT salt) holds out three and trains on the rest (checked in a test below).
ROWS = [{"key": f"p{i}", "prompt": f"How long do I bake loaf {i}?",
         "response": f"Bake loaf {i} at 220 C for {20 + i} minutes."} for i in range(8)]
LONG = {"key": "long", "prompt": "word " * 200, "response": "ok"}
# peft calls a transformers property that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def small(**kw) -> SFTSettings:
    base = dict(max_steps=2, batch_size=4, max_length=128, heldout_fraction=0.5, torch_threads=1, seed=7)
    return SFTSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("default")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def full_run(model_dir, tmp_path_factory):
    logged = []
    result = train_sft(model_dir, ROWS + [LONG], small(method="full"),
                       tmp_path_factory.mktemp("sft") / "full", on_step=lambda s, m: logged.append((s, m)))
    return result, logged


@pytest.fixture(scope="module")
def lora_run(model_dir, tmp_path_factory):
    # A large LoRA step so that 2 steps move the merged weights past bf16 rounding.
    return train_sft(model_dir, ROWS, small(method="lora", learning_rate=1e-3, lora_r=8),
                     tmp_path_factory.mktemp("sft") / "lora")


# ---------------------------------------------------------------- examples (tokenizer only)

def test_loss_is_on_the_response_and_end_of_turn_only(tokenizer):
    (ex,), dropped = build_examples(
        tokenizer, [{"key": "k", "prompt": "Hi there", "response": "Hello! How can I help?"}], 128)
    assert dropped == [] and not ex.truncated
    labelled = [t for t in ex.labels if t != IGNORE]
    assert tokenizer.decode(labelled) == "Hello! How can I help?<|im_end|>"
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert tokenizer.decode(ex.input_ids[:first]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    # the response is one contiguous labelled block; the template's newline after it is masked
    last = max(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert all(t != IGNORE for t in ex.labels[first:last + 1])
    assert tokenizer.decode(ex.input_ids[last + 1:]) == "\n" and ex.labels[last + 1:] == [IGNORE]
    assert ex.labels[first:last + 1] == ex.input_ids[first:last + 1]


def test_long_response_keeps_the_prompt_and_cuts_the_tail(tokenizer):
    row = {"key": "k", "prompt": "Hi there", "response": "Hello! How can I help?"}
    (whole,), _ = build_examples(tokenizer, [row], 128)
    n_prompt = next(i for i, t in enumerate(whole.labels) if t != IGNORE)
    (cut,), _ = build_examples(tokenizer, [row], n_prompt + 3)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 3
    assert tokenizer.decode([t for t in cut.labels if t != IGNORE]) == "Hello! How"   # no end-of-turn


def test_rows_that_cannot_train_are_reported_not_skipped(tokenizer):
    rows = [ROWS[0], LONG, {"key": "empty", "prompt": "Hi", "response": "  "}]
    examples, dropped = build_examples(tokenizer, rows, 64)
    assert [e.key for e in examples] == ["p0"]
    assert [(d.key, d.reason) for d in dropped] == [("long", "prompt_too_long"), ("empty", "empty_response")]
    assert "max_length is 64" in dropped[0].detail
    with pytest.raises(ValueError, match=r"row 0 lacks string field\(s\) \['key'\]"):
        build_examples(tokenizer, [{"prompt": "a", "response": "b"}], 64)


def test_heldout_split_is_deterministic_disjoint_and_stable():
    keys = [f"prompt-{i}" for i in range(2000)]
    train, held = split_heldout(keys, 0.1, key=str)
    assert (train, held) == split_heldout(keys, 0.1, key=str)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(keys)
    assert 150 < len(held) < 250
    # a key's side does not depend on the other rows, and a larger fraction only adds keys
    assert split_heldout(keys[::-1], 0.1, key=str)[1] == held[::-1]
    assert set(held) <= set(split_heldout(keys, 0.3, key=str)[1])
    assert [r["key"] for r in ROWS if is_heldout(r["key"], 0.25)] == ["p0", "p2", "p7"]
    assert [r["key"] for r in ROWS if is_heldout(r["key"], 0.5, SFT_SALT)] == ["p3", "p4", "p7"]


def test_sft_holds_out_some_of_the_train_prompts_of_an_ingest_split_lake():
    # SFT rows are the prompts ingest put in its train split (the same hash at 0.1, unsalted):
    # the salted SFT split still holds about 10% of them out. Unsalted it would hold out none.
    ids = [f"prompt-{i}" for i in range(2000)]
    ingest_train = [k for k in ids if split_of(k, 0.1) == "train"]
    assert split_heldout(ingest_train, 0.1, key=str)[1] == []
    train, held = split_heldout(ingest_train, 0.1, key=str, salt=SFT_SALT)
    assert (len(ingest_train), len(train), len(held)) == (1779, 1609, 170)


def test_settings_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="SFTSettings method: 'qlora' is not one of 'full', 'lora'"):
        SFTSettings(method="qlora")
    with pytest.raises(ValueError, match=r"SFTSettings heldout_fraction: 1.0 is not below 1.0"):
        SFTSettings(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="SFTSettings train_dtype: 'fp8' is not one of"):
        SFTSettings(train_dtype="fp8")
    assert SFTSettings(method="lora").learning_rate == 2e-4 and SFTSettings().learning_rate == 1e-5


# ---------------------------------------------------------------- pickles are refused

def test_a_folder_with_pickled_weights_is_refused(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"contains pickle files \['pytorch_model.bin'\]"):
        assert_no_pickles(tmp_path)
    with pytest.raises(ValueError, match="we load safetensors only"):
        load_safetensors_folder(tmp_path)
    with pytest.raises(ValueError, match="pickle files"):
        train_sft(tmp_path, ROWS, small(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- real training runs

def test_full_finetune_trains_reports_and_saves_safetensors(full_run):
    result, logged = full_run
    assert result.method == "full" and result.steps == 2 and len(result.train_losses) == 2
    assert all(math.isfinite(x) for x in result.train_losses)
    assert [s for s, _ in logged] == [1, 2] and [m["loss"] for _, m in logged] == result.train_losses
    assert logged[0][1]["lr"] == pytest.approx(1e-5) and logged[1][1]["lr"] == pytest.approx(5e-6)
    assert (result.n_train, result.n_heldout, result.heldout_keys) == (5, 3, ["p3", "p4", "p7"])
    assert [(d.key, d.reason) for d in result.dropped] == [("long", "prompt_too_long")]
    assert math.isfinite(result.heldout_loss_before) and math.isfinite(result.heldout_loss_after)
    assert result.heldout_loss_after != result.heldout_loss_before
    assert 0 < result.changed_params <= result.total_params

    out = result.out_dir
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert_no_pickles(out)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16     # saved in the base folder's dtype


def test_lora_is_merged_and_changes_only_attention_projections(lora_run, model_dir):
    result = lora_run
    assert result.method == "lora" and all(math.isfinite(x) for x in result.train_losses)
    assert result.heldout_loss_after < result.heldout_loss_before
    assert not list(result.out_dir.glob("adapter_*"))          # merged, not an adapter folder
    model, _ = load_safetensors_folder(result.out_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    base, tuned = load_file(model_dir / "model.safetensors"), load_file(result.out_dir / "model.safetensors")
    assert base.keys() == tuned.keys()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) == result.changed_params > 0
    assert all(k.endswith(tuple(f"{m}.weight" for m in ATTENTION)) for k in changed), changed


def test_same_rows_and_settings_give_the_same_weights(lora_run, model_dir, tmp_path):
    # LoRA exercises every seeded draw: the adapter init, dropout and the row shuffle.
    again = train_sft(model_dir, ROWS, small(method="lora", learning_rate=1e-3, lora_r=8), tmp_path / "again")
    assert again.train_losses == lora_run.train_losses       # same process, same threads: bit-exact
    first, second = load_file(lora_run.out_dir / "model.safetensors"), load_file(again.out_dir / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
