"""Constitution files, loader and validator: pure and fast (no model, no Spark).

    python -m pytest -q tests/test_constitution.py
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from cai_lib.constitution.load import constitution_to_yaml, load_constitution
from cai_lib.constitution.model import (TEMPLATE_PLACEHOLDERS, Constitution, ConstitutionError,
                                        constitution_from_dict, content_sha256)
from cai_lib.constitution.paper import constitution_from_paper

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {  # file -> (id, critique_revision count, comparison count)
    "default.yaml": ("cai-default", 16, 16),
    "medical_information.yaml": ("medical-information", 8, 8),
    "customer_service.yaml": ("customer-service", 8, 8),
}
PAPER_DIR = Path(__file__).parents[2] / "shared/data/constitutional-harmlessness-paper/prompts"
needs_paper = pytest.mark.skipif(
    not PAPER_DIR.is_dir(), reason=f"paper prompts not present at {PAPER_DIR} (shared data folder absent)")


# --- shipped constitutions ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_constitution_loads_with_expected_counts(name):
    cid, n_crit, n_comp = SHIPPED[name]
    c = load_constitution(ROOT / "constitutions" / name)
    assert (c.id, len(c.critique_revision), len(c.comparison)) == (cid, n_crit, n_comp)
    for section in (c.critique_revision, c.comparison):
        ids = [p.id for p in section]
        assert len(set(ids)) == len(ids)
    assert c.few_shot_critique and c.few_shot_comparison
    assert all(p.critique.strip() and p.revision.strip() for p in c.critique_revision)
    # each comparison principle is one question, to be followed by options (A)/(B)
    assert all(p.text.endswith("?") and "Options" not in p.text for p in c.comparison)
    assert c.source.endswith(name) and len(c.sha256) == 64


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_sha_is_stable_and_yaml_round_trip_keeps_it(name, tmp_path):
    a = load_constitution(ROOT / "constitutions" / name)
    b = load_constitution(ROOT / "constitutions" / name)
    assert a.sha256 == b.sha256 == content_sha256(a)
    out = tmp_path / "round.yaml"
    out.write_text(constitution_to_yaml(a), encoding="utf-8")
    c = load_constitution(out)
    assert c.sha256 == a.sha256 and c == a  # `source` differs and is not compared


def test_sha_ignores_formatting_but_tracks_text(tmp_path):
    src = ROOT / "constitutions" / "default.yaml"
    base = load_constitution(src)
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text("# a new comment\n" + yaml.safe_dump(data, width=40), encoding="utf-8")
    assert load_constitution(reformatted).sha256 == base.sha256
    data["comparison"][3]["text"] = data["comparison"][3]["text"].replace("racism", "prejudice")
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_constitution(edited).sha256 != base.sha256


def test_lookup_and_immutability():
    c = load_constitution(ROOT / "constitutions" / "default.yaml")
    assert c.critique_principle("privacy").tags[0] == "privacy"
    assert c.comparison_principle("less-harmful").text.startswith("Which")
    with pytest.raises(KeyError, match="no critique_revision principle 'nope'.*known ids: harmful-content"):
        c.critique_principle("nope")
    with pytest.raises(KeyError, match="no comparison principle"):
        c.comparison_principle("privacy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.id = "x"
    with pytest.raises(TypeError):
        c.templates["initial"] = "{prompt}"
    assert hash(c) == hash(load_constitution(ROOT / "constitutions" / "default.yaml"))


def test_direct_construction_computes_sha_and_accepts_lists():
    c = load_constitution(ROOT / "constitutions" / "customer_service.yaml")
    d = Constitution(id=c.id, version=c.version, description=c.description,
                     critique_revision=list(c.critique_revision), comparison=list(c.comparison),
                     few_shot_critique=list(c.few_shot_critique), few_shot_comparison=list(c.few_shot_comparison))
    assert d.sha256 == c.sha256 and isinstance(d.comparison, tuple)
    assert dataclasses.replace(d, version="1.0.1").sha256 != d.sha256


def test_template_placeholders_shape():
    assert TEMPLATE_PLACEHOLDERS["initial"] == {"prompt"}
    assert TEMPLATE_PLACEHOLDERS["cot"] == {"conversation", "principle", "response_a", "response_b"}


# --- validation errors ------------------------------------------------------------------------

def _valid() -> dict:
    return {
        "id": "tiny", "version": "0.1", "description": "A tiny test constitution.",
        "critique_revision": [
            {"id": "a", "critique": "What is wrong with your answer?", "revision": "Fix it."},
            {"id": "b", "critique": "Is it rude?", "revision": "Make it polite.", "tags": ["tone"]},
        ],
        "comparison": [{"id": "c", "text": "Which response is kinder?"}],
        "few_shot": {
            "critique_revision": [{"prompt": "p", "response": "r", "critique": "c", "revision": "v"}],
            "comparison": [{"prompt": "p", "response_a": "x", "response_b": "y", "answer": "A"}],
        },
        "templates": {"initial": "Human: {prompt}\n\nAssistant:",
                      "comparison": "{conversation}\n{principle}\n(A) {response_a}\n(B) {response_b}\n{{json}}"},
    }


def _write(tmp_path: Path, data, name="bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_valid_tiny_constitution_with_template_overrides(tmp_path):
    c = load_constitution(_write(tmp_path, _valid(), "good.yaml"))
    assert dict(c.templates)["comparison"].endswith("{{json}}")
    assert c.few_shot_comparison[0].answer == "A" and c.critique_revision[1].tags == ("tone",)
    again = tmp_path / "again.yaml"
    again.write_text(constitution_to_yaml(c), encoding="utf-8")
    assert load_constitution(again).sha256 == c.sha256


DELETE = object()


def _set(path: str, value):
    """Mutation setting data[path] (dotted, ints index lists); value DELETE removes the key."""
    def mutate(d):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            d = d[k]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return mutate


ERROR_CASES = {  # name -> (mutation of _valid(), substrings the message must contain: entry, problem, hint)
    "top-level-not-mapping": (None, ("top level", "expected a mapping", "'key: value' lines")),  # a list
    "unknown-top-key": (_set("principles", []), ("top level", "'principles'", "allowed keys: id, version")),
    "unknown-principle-key": (_set("critique_revision.1.critque", "x"),
                              ("critique_revision[1] (id 'b')", "'critque'", "allowed keys: id, critique, revision, tags")),
    "unknown-few-shot-key": (_set("few_shot.examples", []), ("few_shot", "'examples'", "allowed keys")),
    "unknown-few-shot-entry-key": (_set("few_shot.comparison.0.winner", "A"),
                                   ("few_shot.comparison[0]", "'winner'", "allowed keys")),
    "missing-top-key": (_set("version", DELETE), ("top level", "'version'", "add version: ...")),
    "missing-principle-key": (_set("critique_revision.0.revision", DELETE),
                              ("critique_revision[0] (id 'a')", "'revision'", "add revision: ...")),
    "version-not-string": (_set("version", 1.0), ("top level", "'version' must be a string", "quote it")),
    "principles-not-list": (_set("comparison", {"id": "c"}), ("comparison", "expected a list", "'- ' item")),
    "tags-not-list": (_set("comparison.0.tags", "harm"), ("comparison[0] (id 'c')", "'tags'", "tags: [harm, ethics]")),
    "empty-text": (_set("critique_revision.1.critique", "   \n"),
                   ("critique_revision[1] (id 'b')", "'critique' is empty", "write the critique text")),
    "duplicate-id": (_set("critique_revision.1.id", "a"),
                     ("critique_revision[1] (id 'a')", "already used by critique_revision[0]", "its own id")),
    "bad-id": (_set("comparison.0.id", "Kinder Response"),
               ("comparison[0] (id 'Kinder Response')", "outside [a-z0-9._-]", "lower-case letters")),
    "bad-answer": (_set("few_shot.comparison.0.answer", "C"), ("few_shot.comparison[0]", "'A' or 'B'", "answer: A when")),
    "unknown-template": (_set("templates.judge", "{prompt}"), ("templates.judge", "unknown template", "initial, critique")),
    "missing-placeholder": (_set("templates.critique", "Review your answer."),
                            ("templates.critique", "missing placeholder(s) {request}", "placeholders {request}")),
    "unknown-placeholder": (_set("templates.revision", "{request} {principle}"),
                            ("templates.revision", "unknown placeholder(s) {principle}", "placeholders {request}")),
    "positional-placeholder": (_set("templates.initial", "{prompt} {}"), ("templates.initial", "positional", "{prompt}")),
    "no-principles": (lambda d: d.update(critique_revision=[], comparison=[]),
                      ("top level", "no principles", "add at least one")),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_validation_error_names_file_entry_and_fix(case, tmp_path):
    mutate, expected = ERROR_CASES[case]
    data = copy.deepcopy(_valid())
    if mutate is None:
        data = [data]
    else:
        mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "Fix:" in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_missing_file(tmp_path):
    with pytest.raises(ConstitutionError, match=r"nowhere\.yaml: file not found\. Fix: check the path"):
        load_constitution(tmp_path / "nowhere.yaml")


def test_yaml_syntax_error_reports_line(tmp_path):
    path = _write(tmp_path, "id: x\nversion: '1'\ndescription: [unclosed\ncritique_revision: []\n")
    with pytest.raises(ConstitutionError, match=r"bad\.yaml: YAML syntax error at line \d+, column \d+.*Fix:"):
        load_constitution(path)


def test_yaml_duplicate_key_is_an_error(tmp_path):
    text = yaml.safe_dump(_valid(), sort_keys=False).replace("version: '0.1'", "version: '0.1'\nversion: '0.2'")
    with pytest.raises(ConstitutionError, match=r"bad\.yaml: YAML syntax error at line 3.*'version' appears twice"):
        load_constitution(_write(tmp_path, text))


def test_unsupported_suffix_and_unknown_json(tmp_path):
    with pytest.raises(ConstitutionError, match=r"bad\.txt: unsupported file type '\.txt'\. Fix"):
        load_constitution(_write(tmp_path, "id: x", "bad.txt"))
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"prompt": "x"}]), encoding="utf-8")
    with pytest.raises(ConstitutionError, match=r"other\.json: this JSON is neither.*Fix: pass one of"):
        load_constitution(path)


def test_from_dict_source_defaults_to_dict_marker():
    with pytest.raises(ConstitutionError, match=r"^<dict>: top level: missing required key"):
        constitution_from_dict({"id": "x"})


# --- the paper's published JSON -------------------------------------------------------------------

@needs_paper
def test_paper_critique_revision_json():
    c = load_constitution(PAPER_DIR / "CritiqueRevisionInstructions.json")
    assert [p.id for p in c.critique_revision] == [f"harmful{i}" for i in range(16)]
    assert c.comparison == ()
    for p in c.critique_revision:
        assert p.critique and p.revision
        for frame in ("CritiqueRequest:", "Critique:", "RevisionRequest:", "Revision:"):
            assert frame not in p.critique and frame not in p.revision
        assert p.critique == p.critique.strip()


@needs_paper
def test_paper_comparison_json_and_full_constitution(tmp_path):
    half = load_constitution(PAPER_DIR / "RLMadisonInstructions.json")
    assert [p.id for p in half.comparison] == [f"rl{i}" for i in range(16)] and half.critique_revision == ()
    assert all(p.text and not p.text.endswith("Options:") and p.text == p.text.strip() for p in half.comparison)
    full = constitution_from_paper(PAPER_DIR / "CritiqueRevisionInstructions.json",
                                   PAPER_DIR / "RLMadisonInstructions.json")
    assert (full.id, full.version) == ("anthropic-paper-2022", "2022-12")
    assert (len(full.critique_revision), len(full.comparison)) == (16, 16)
    assert full.comparison == half.comparison
    out = tmp_path / "paper.yaml"
    out.write_text(constitution_to_yaml(full), encoding="utf-8")
    assert load_constitution(out).sha256 == full.sha256
    with pytest.raises(ConstitutionError, match="CritiqueRevisionFewShotPrompts.json: entry \\[0\\].*Options:"):
        load_constitution(PAPER_DIR / "CritiqueRevisionFewShotPrompts.json")


def test_paper_import_from_parsed_json_and_bad_frames():
    crit = {"harmful0": {"prompt": ["\n\nCritiqueRequest: Is it bad?\n\nCritique:"],
                         "edit_request": "\n\nRevisionRequest: Make it good.\n\nRevision:"}}
    c = constitution_from_paper(crit, ["\nWhich is better? Options:"], id="paper-test", version="1")
    assert c.critique_principle("harmful0").critique == "Is it bad?"
    assert c.critique_principle("harmful0").revision == "Make it good."
    assert c.comparison_principle("rl0").text == "Which is better?"
    crit["harmful0"]["prompt"] = ["Is it bad?"]
    with pytest.raises(ConstitutionError, match="entry 'harmful0'.*'prompt\\[0\\]'.*Fix"):
        constitution_from_paper(crit)
    with pytest.raises(ConstitutionError, match="no input"):
        constitution_from_paper()
