"""Chunks sized by time: the fake at a GPU's speed (`fake:latency=S`), the sizing rules with exact
values, and a Spark run on `local[1]` whose chunks follow the measured time."""
from __future__ import annotations

import pytest

from cai_lib.backends import Sampling
from cai_lib.backends.fake import FakeBackend, check_fake_model

CHATS = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "How are you"}]]


def test_the_latency_fake_sleeps_once_per_call_and_writes_the_plain_fakes_text(monkeypatch):
    slept = []
    monkeypatch.setattr("cai_lib.backends.fake.time.sleep", slept.append)
    fast, slow = FakeBackend("fake"), FakeBackend("fake:latency=0.2")
    sampling = Sampling(0.7, 0.9, 16)
    assert slow.generate(CHATS, sampling, [1, 2]) == fast.generate(CHATS, sampling, [1, 2])
    assert slow.generate(CHATS[:1], sampling, [1]) == fast.generate(CHATS[:1], sampling, [1])
    assert slow.choice_logprobs(["p1", "p2"], [" (A)", " (B)"]) == fast.choice_logprobs(["p1", "p2"], [" (A)", " (B)"])
    assert slept == [0.2, 0.2, 0.2]   # per call (two generates, one scoring), not per sequence
    assert slow.fingerprint == fast.fingerprint   # same ids: a bench's events are the plain fake's


@pytest.mark.parametrize("model", ["fake:latency=-1", "fake:latency=soon", "fake:latency=inf"])
def test_a_bad_latency_is_refused_on_the_driver(model):
    with pytest.raises(ValueError, match=rf"^fake model '{model}': the latency must be a number of seconds >= 0 "
                                         r"and finite, like fake:latency=0.2$"):
        check_fake_model("fake", model)
