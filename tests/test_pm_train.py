"""The preference model on the real default model (SmolLM2-135M-Instruct, CPU): rendering,
last-token reading, a few training steps, save/load, evaluation on HH-RLHF pairs.

Kept tiny (8 rows, max_length 128, a few steps) and on one torch thread, so the file runs
in well under a minute on 2 shared cores.

    python -m pytest -q tests/test_pm_train.py cai_lib/training/pm_train.py
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from cai_lib.backends.weights import resolve_dtype, torch_dtype
from cai_lib.feedback.labels import conversation_text
from cai_lib.feedback.preferences import dialogue_text
from cai_lib.ids import split_heldout
from cai_lib.sources.eval_data import read_hh_pairs
from cai_lib.training.pm_train import (HEAD_FILE, PM_CONFIG, PMSettings, PreferenceModel, evaluate_pm, prompt_turns,
                                       render, train_pm)
from tests.conftest import SHARED

HARMLESS_TEST = SHARED / "hh-rlhf/harmless-base/test.jsonl.gz"
MAX_LEN = 128

POLITE = ["Of course! I'd be glad to help you with that.",
          "Thank you for asking. Here is a careful, kind answer.",
          "Happy to help: let me explain it step by step.",
          "That's a great question, and I'm glad you asked."]
RUDE = ["No. Figure it out yourself, idiot.",
        "Stop wasting my time with stupid questions.",
        "Ugh, whatever. Go away.",
        "Shut up, nobody cares."]
QUESTIONS = ["How do I bake bread?", "Can you explain photosynthesis?",
             "What is a good name for a cat?", "How do I fix a flat tyre?"]


def polite_rows(n: int = 8) -> list[dict]:
    """target 1.0 always means response A is the polite one; half the rows put it in B (target 0)."""
    rows = []
    for i in range(n):
        polite, rude = POLITE[i % 4], RUDE[(i + 1) % 4]
        a_polite = i % 2 == 0
        prompt = (conversation_text(QUESTIONS[i % 4]) if i % 3 else
                  dialogue_text([("human", "Hi"), ("assistant", "Hello!"), ("human", QUESTIONS[i % 4])]))
        rows.append({"pair_id": f"pair-{i}", "prompt": prompt,
                     "response_a": polite if a_polite else rude, "response_b": rude if a_polite else polite,
                     "target": 1.0 if a_polite else 0.0,
                     "source": "human_helpful" if i % 4 == 0 else "ai_harmless"})
    return rows


@pytest.fixture(scope="module")
def base_pm() -> PreferenceModel:
    torch.set_num_threads(1)   # 2 threads on 2 busy shared cores ran 10-15x slower (OpenMP contention)
    return PreferenceModel.from_backbone("default", seed=0, max_length=MAX_LEN)


# ---------------------------------------------------------------- rendering

def test_prompt_turns_parses_dialogue_text_back():
    turns = [("human", "Hi there"), ("assistant", "Hello! How can I help?"), ("human", "Tell me a joke.")]
    assert prompt_turns(dialogue_text(turns)) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."}]
    # AI rows hold "Human: <prompt>"; raw prompts and a trailing "Assistant:" cue work too
    assert prompt_turns(conversation_text("Why is the sky blue?")) == [
        {"role": "user", "content": "Why is the sky blue?"}]
    assert prompt_turns("Why is the sky blue?") == [{"role": "user", "content": "Why is the sky blue?"}]
    assert prompt_turns("\n\nHuman: q\n\nAssistant:") == [{"role": "user", "content": "q"}]


def test_render_uses_chat_template_and_keeps_the_response_end(base_pm):
    tok = base_pm.tokenizer
    prompt = dialogue_text([("human", "Hi"), ("assistant", "Hello!"), ("human", "Count for me.")])
    short = tok.decode(render(tok, prompt, "One, two.", 512))
    assert short == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Count for me."}, {"role": "assistant", "content": "One, two."}],
        tokenize=False)
    long_response = " ".join(f"number{i}" for i in range(200)) + " THE END"
    ids = render(tok, prompt, long_response, 64)
    assert len(ids) == 64
    text = tok.decode(ids)
    assert "THE END" in text and "Count for me" not in text      # cut from the left
    assert text.endswith(tok.decode(render(tok, prompt, long_response, 512))[-40:])


# ---------------------------------------------------------------- the model

def test_head_reads_the_last_real_token(base_pm):
    short, long = "Human: hi", "Human: a longer text, with many more tokens in it than the first"
    captured = []
    hook = base_pm.backbone.register_forward_hook(lambda m, i, out: captured.append(out.last_hidden_state))
    try:
        alone = base_pm.score([short])
        batched = base_pm.score([short, long])           # `short` is right-padded here
    finally:
        hook.remove()
    assert torch.allclose(alone, batched[:1], atol=0.05), (alone, batched)
    # reading the padded end instead would give another score, so the check above can fail
    at_pad = base_pm.head(captured[-1][0, -1].float()).item()
    assert abs(at_pad - alone.item()) > 0.05


def test_pickle_weight_files_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (tmp_path / PM_CONFIG).write_text("{}")
    with pytest.raises(ValueError, match="pickle"):
        PreferenceModel.load(tmp_path)


# ---------------------------------------------------------------- training

def test_train_three_steps_then_save_load_round_trip(base_pm, tmp_path):
    rows = polite_rows(8)
    settings = PMSettings(max_steps=3, batch_size=2, max_length=MAX_LEN, heldout_fraction=0.25,
                          seed=0, torch_threads=1, train_backbone=False)    # seed 0: base_pm's head init
    seen = []
    result = train_pm("default", rows, settings, tmp_path / "pm", on_step=lambda s, m: seen.append((s, m)))
    assert result.steps == 3 and [s for s, _ in seen] == [1, 2, 3]
    assert all(math.isfinite(x) for x in result.train_losses) and len(result.train_losses) == 3
    train, held = split_heldout(rows, 0.25, key=lambda r: str(r["pair_id"]))
    assert (result.n_train, result.n_heldout) == (len(train), len(held)) and held
    assert math.isfinite(result.heldout_loss_before) and math.isfinite(result.heldout_loss_after)

    folder = tmp_path / "pm"
    assert (folder / HEAD_FILE).is_file() and (folder / PM_CONFIG).is_file()
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    loaded = PreferenceModel.load(folder)
    assert not torch.equal(loaded.head.weight, base_pm.head.weight)        # the head trained
    for p, q in zip(loaded.backbone.parameters(), base_pm.backbone.parameters()):
        assert torch.equal(p, q.to(p.dtype))                               # the backbone did not
    computes = resolve_dtype("auto", "cpu")                                # float32 on a CPU without bf16
    assert next(loaded.backbone.parameters()).dtype == torch_dtype(computes)
    assert json.loads((folder / PM_CONFIG).read_text())["dtype"] == computes
    texts = ["Human: hi", "Human: how are you today?"]
    assert torch.equal(result.pm.score(texts), loaded.score(texts))        # identical after reload


def test_head_only_training_is_deterministic_and_lowers_the_loss(tmp_path):
    settings = PMSettings(max_steps=10, epochs=10, batch_size=8, max_length=MAX_LEN, heldout_fraction=0.0,
                          seed=3, torch_threads=1, train_backbone=False, head_learning_rate=1e-3)
    result = train_pm("default", polite_rows(8), settings, tmp_path / "pm")
    again = train_pm("default", polite_rows(8), settings, tmp_path / "pm2")
    assert again.train_losses == result.train_losses                       # deterministic given the seed
    assert torch.equal(again.pm.head.weight, result.pm.head.weight)
    assert result.n_train == 8 and result.n_heldout == 0 and result.heldout_loss_after is None
    losses = result.train_losses
    assert len(losses) == 10 and losses[-1] < losses[0], losses
    assert result.metrics()["steps"] == 10.0


def test_load_computes_in_float32_on_a_cpu_without_bf16_unless_told(base_pm, tmp_path):
    assert next(base_pm.backbone.parameters()).dtype == torch.bfloat16     # the checkpoint's dtype
    base_pm.save(tmp_path / "pm")
    saved = json.loads((tmp_path / "pm" / PM_CONFIG).read_text())["dtype"]
    assert saved == "bfloat16"
    loaded = PreferenceModel.load(tmp_path / "pm", device="cpu")
    widened = torch.float32 if resolve_dtype("auto", "cpu") == "float32" else torch.bfloat16
    assert next(loaded.backbone.parameters()).dtype == widened
    kept = PreferenceModel.load(tmp_path / "pm", device="cpu", dtype="bfloat16")
    assert next(kept.backbone.parameters()).dtype == torch.bfloat16
    texts = ["Human: hi"]
    assert torch.allclose(loaded.score(texts), base_pm.score(texts), atol=0.1)   # same model, wider sums


def test_backbone_training_updates_the_backbone_in_float32(base_pm, tmp_path):
    settings = PMSettings(max_steps=1, batch_size=1, max_length=48, heldout_fraction=0.0, seed=0,
                          torch_threads=1, train_backbone=True, learning_rate=1e-4)
    result = train_pm("default", polite_rows(2), settings, tmp_path / "pm")
    assert result.steps == 1 and math.isfinite(result.train_losses[0])
    emb = result.pm.backbone.get_input_embeddings().weight
    assert emb.dtype == torch.float32                  # bf16 AdamW updates would round away
    assert json.loads((tmp_path / "pm" / PM_CONFIG).read_text())["dtype"] == "float32"
    assert not torch.equal(emb, base_pm.backbone.get_input_embeddings().weight.float())


def test_settings_and_rows_are_checked_at_the_edge(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        PMSettings(heldout_fraction=1.0)
    bad = polite_rows(2)
    bad[1]["target"] = 1.5
    with pytest.raises(ValueError, match=r"rows\[1\].*target"):
        train_pm("default", bad, PMSettings(), tmp_path / "pm")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="out_dir"):
        train_pm("default", polite_rows(2), PMSettings(), tmp_path / "busy")


# ---------------------------------------------------------------- evaluation

@pytest.mark.skipif(not HARMLESS_TEST.exists(), reason=f"{HARMLESS_TEST} absent (see shared/data/README.md)")
def test_evaluate_on_ten_human_pairs(base_pm):
    pairs, _ = read_hh_pairs(HARMLESS_TEST, limit=10, seed=0)
    got = evaluate_pm(base_pm, pairs, batch_size=10)
    assert got["n"] == 10
    # recomputed pair by pair, one score call each: the share where chosen scores strictly higher
    wins = [float(base_pm.score_pairs([dialogue_text(p.context)] * 2, [p.chosen, p.rejected], 2).diff().item() < 0)
            for p in pairs]
    assert got["accuracy"] == pytest.approx(sum(wins) / 10)
    assert math.isfinite(got["ece"]) and math.isfinite(got["mean_margin"])
    assert sum(b["count"] for b in got["reliability"]) == 20            # both presentation orders
