"""Pure logic: ids, seeds, templates, parsers, chain planning, config. No model, no Spark."""
from __future__ import annotations

import dataclasses

import pytest

from cai_lib.backends import Sampling
from cai_lib.backends.fake import FAKE_FINGERPRINT
from cai_lib.config import ConfigError, load_config
from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.templates import DEFAULT_TEMPLATES, critique_chat, parse_output, revision_chat
from cai_lib.ids import derive_seed, stable_id
from cai_lib.sl.chain import SLContext, SLSettings, plan_chain, sample_principle, step_chat
from jobs.sl_generate import SLGenerateConfig
from tests.conftest import ROOT

DEFAULT = load_constitution(ROOT / "constitutions/default.yaml")


def ctx(**kw) -> SLContext:
    return SLContext(DEFAULT, "fake", FAKE_FINGERPRINT, "fake", SLSettings(**{"rounds": 2, **kw}))


def test_stable_id_depends_on_every_part():
    base = stable_id("critique", parents=["a"], seed=1)
    assert base == stable_id("critique", seed=1, parents=["a"])
    assert base != stable_id("critique", parents=["b"], seed=1)
    assert base != stable_id("revision", parents=["a"], seed=1)
    assert stable_id("prompt", kind="x") != stable_id("prompt", kind="y")  # 'kind' is a part, not the id kind


def test_derive_seed_is_keyed_and_in_range():
    seeds = {derive_seed(1, "p", k, r) for k in ("critique", "revision") for r in range(10)}
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, "p", "critique", 1) != derive_seed(2, "p", "critique", 1)


def test_plan_chain_shape_and_parent_links():
    chain = plan_chain(ctx(), "p1", "red_team")
    assert [s.kind for s in chain] == ["initial_response", "critique", "revision", "critique", "revision"]
    assert [s.wave for s in chain] == [0, 1, 2, 3, 4]
    assert chain[0].parent_id is None
    for prev, step in zip(chain, chain[1:]):
        assert step.parent_id == prev.event_id
    assert chain[1].principle_id == chain[2].principle_id  # one principle per round
    assert len({s.event_id for s in chain}) == 5
    assert [s.kind for s in plan_chain(ctx(), "p2", "helpful")] == ["helpful_response"]


def test_plan_ids_are_deterministic_and_sensitive_to_config():
    a = [s.event_id for s in plan_chain(ctx(), "p1", "red_team")]
    assert a == [s.event_id for s in plan_chain(ctx(), "p1", "red_team")]
    assert a[0] != plan_chain(ctx(seed=9), "p1", "red_team")[0].event_id
    other_sampling = ctx(answer=Sampling(temperature=0.1))
    assert a[0] != plan_chain(other_sampling, "p1", "red_team")[0].event_id
    assert a[1] != plan_chain(ctx(few_shot=1), "p1", "red_team")[1].event_id  # template sha moves
    edited = dataclasses.replace(DEFAULT, description=DEFAULT.description + " (edited)")
    c2 = SLContext(edited, "fake", FAKE_FINGERPRINT, "fake", SLSettings(rounds=2))
    assert a[0] != plan_chain(c2, "p1", "red_team")[0].event_id  # constitution sha is in every id


def test_principle_sampling_is_seeded_and_covers_the_constitution():
    picks = [sample_principle(ctx(), f"p{i}", 1).id for i in range(400)]
    assert picks == [sample_principle(ctx(), f"p{i}", 1).id for i in range(400)]
    assert len(set(picks)) == len(DEFAULT.critique_revision) == 16


def test_critique_and_revision_chats_carry_the_principle():
    p = DEFAULT.critique_revision[0]
    c = critique_chat("How do I X?", "Do Y.", p, DEFAULT)
    assert [m["role"] for m in c] == ["user", "assistant", "user"]
    assert p.critique in c[-1]["content"] and c[1]["content"] == "Do Y."
    r = revision_chat("How do I X?", "Do Y.", "It is unsafe.", p, DEFAULT)
    assert [m["role"] for m in r] == ["user", "assistant", "user", "assistant", "user"]
    assert r[3]["content"] == "It is unsafe." and p.revision in r[-1]["content"]
    with_shots = critique_chat("How do I X?", "Do Y.", p, DEFAULT, few_shot=1)
    assert len(with_shots) == len(c) + 4 and with_shots[0]["content"] == DEFAULT.few_shot_critique[0].prompt


def test_step_chat_revision_reads_the_response_and_its_critique():
    chain = plan_chain(ctx(rounds=1), "p1", "red_team")
    texts = {chain[0].event_id: "first answer", chain[1].event_id: "a critique"}
    chat = step_chat(ctx(rounds=1), chain, 2, "the prompt", texts)
    assert chat[0]["content"] == "the prompt" and chat[1]["content"] == "first answer"
    assert chat[3]["content"] == "a critique"


@pytest.mark.parametrize("raw,kind,want", [
    ("Revision: Here it is.", "revision", "Here it is."),
    ("**Revised response:** Fine.", "revision", "Fine."),
    ('"quoted"', "critique", "quoted"),
    ("Revision: stays", "initial_response", "Revision: stays"),
])
def test_parse_output(raw, kind, want):
    assert parse_output(kind, raw) == want


def test_default_templates_have_their_placeholders():
    from cai_lib.constitution.model import TEMPLATE_PLACEHOLDERS, template_fields
    for name, text in DEFAULT_TEMPLATES.items():
        assert template_fields(text) == set(TEMPLATE_PLACEHOLDERS[name])


def test_config_layers_and_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("common:\n  lake: L\nsl_generate:\n  rounds: 3\n")
    cfg = load_config(SLGenerateConfig, "sl_generate", ["--params", str(params), "--batch-size", "5"])
    assert (cfg.lake, cfg.rounds, cfg.batch_size, cfg.splits) == ("L", 3, 5, ["train"])
    params.write_text("sl_generate:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml \[sl_generate\]: unknown key 'roundz'.*rounds"):
        load_config(SLGenerateConfig, "sl_generate", ["--params", str(params)])
    with pytest.raises(ConfigError, match="flag --batch-size: 0 is below the minimum 1"):
        load_config(SLGenerateConfig, "sl_generate", ["--params", "/dev/null", "--batch-size", "0"])


def test_cai_params_names_the_params_file_when_no_flag_does(tmp_path, monkeypatch):
    env, flag = tmp_path / "env.yaml", tmp_path / "flag.yaml"
    env.write_text("common:\n  seed: 9\nsl_generate:\n  rounds: 3\n")
    flag.write_text("sl_generate:\n  rounds: 5\n")
    monkeypatch.setenv("CAI_PARAMS", str(env))
    cfg = load_config(SLGenerateConfig, "sl_generate", [])
    assert (cfg.params, cfg.seed, cfg.rounds) == (str(env), 9, 3)
    cfg = load_config(SLGenerateConfig, "sl_generate", ["--params", str(flag)])   # the flag wins
    assert (cfg.params, cfg.seed, cfg.rounds) == (str(flag), SLGenerateConfig.seed, 5)
    monkeypatch.delenv("CAI_PARAMS")
    assert load_config(SLGenerateConfig, "sl_generate", ["--params", str(flag)]).params == str(flag)
    assert load_config(SLGenerateConfig, "sl_generate", []).params == "params.yaml"


def test_project_params_file_is_valid():
    """params.yaml (what dvc repro runs) parses into every job's config."""
    from jobs.ingest import IngestConfig
    assert load_config(SLGenerateConfig, "sl_generate", ["--params", str(ROOT / "params.yaml")]).rounds >= 1
    assert load_config(IngestConfig, "ingest", ["--params", str(ROOT / "params.yaml")]).sources
