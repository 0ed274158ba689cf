"""vLLM for real on CPU (the `vllm-cpu` build) against the transformers backend, same model, fp32.

Runs in the vLLM environment only (`make vllm-env`):
    .venv-vllm/bin/python -m pytest -q tests/test_vllm_cpu.py
In the main environment (no vllm) the engine tests skip and the pure settings tests run.
One engine start per module (about 1-2 min on 2 cores, enforce_eager); a few prompts.
"""
from __future__ import annotations

import os
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
    for env in ("CAI_VLLM_GPU_MEMORY_UTILIZATION", "CAI_VLLM_ENFORCE_EAGER"):
        monkeypatch.delenv(env, raising=False)
    assert engine_settings("cpu", None, None, ram=(24.0, 20.0)) == {"gpu_memory_utilization": 0.2, "enforce_eager": True}
    assert engine_settings("cuda", None, None) == {"gpu_memory_utilization": 0.85, "enforce_eager": False}
    monkeypatch.setenv("CAI_VLLM_ENFORCE_EAGER", "false")
    assert engine_settings("cpu", 0.1, None, ram=(24.0, 20.0)) == {"gpu_memory_utilization": 0.1, "enforce_eager": False}


def test_a_ram_share_that_is_not_free_is_refused_before_start():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.85 asks for 20.4 GiB of RAM but 17.8 GiB are free"):
        engine_settings("cpu", 0.85, None, ram=(24.0, 17.8))
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5 must be in"):
        engine_settings("cuda", 1.5, None)
    with pytest.raises(ValueError, match="device 'tpu' has no engine settings"):
        engine_settings("tpu", None, None)


# -- pure: .venv-vllm holds the whole job stack ---------------------------------------------------
def test_every_import_of_every_job_is_pinned_in_the_vllm_env():
    """`cai <job> --backend vllm` runs from .venv-vllm, so every third-party import of the jobs must be pinned
    there (torch is installed first, by itself; vllm comes as vllm-cpu); the pins differ from the main set
    only where vllm-cpu asks."""
    from tests.test_gpu_env import RUNTIME_ONLY, norm, pyproject, requirements, third_party_imports
    pins = requirements(ln.split(" --hash")[0] for ln in (ROOT / "requirements-vllm-cpu.txt").read_text().splitlines())
    have = set(pins) | {"torch", "vllm", "opencv-python"}   # opencv: pinned as opencv-python-headless
    missing = {d: where[:2] for d, where in third_party_imports().items() if d not in have}
    assert not missing and RUNTIME_ONLY <= set(pins), f"add to requirements-vllm-cpu.txt: {missing}"
    assert all(str(r.specifier).startswith("==") for r in pins.values())
    local = requirements(pyproject()["optional-dependencies"]["local"])
    differ = {n for n, r in local.items() if n in pins and not r.specifier.contains(str(pins[n].specifier)[2:])}
    assert differ <= {"transformers", "fastapi", "numpy"}, differ


def test_make_test_vllm_runs_the_vllm_tests_in_their_env():
    make = (ROOT / "Makefile").read_text()
    vllm = make.split("\ntest-vllm:", 1)[1].split("\n\n", 1)[0]
    assert vllm.splitlines()[0].split() == ["vllm-env"]
    assert "PYSPARK_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python" in vllm and "tests/test_vllm_plane.py" in make


# -- the real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    pytest.importorskip("vllm", reason="vLLM is not installed here: build .venv-vllm with `make vllm-env` and run "
                                       ".venv-vllm/bin/python -m pytest tests/test_vllm_cpu.py")
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
                                                                            "enforce_eager": True})
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
