"""Property tests (hypothesis): no input makes the prompt readers, the evaluation-data readers, the
constitution loader or the output parsers fail with anything but the project's own errors, and
what they do return has the shape the jobs rely on."""
from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai_lib.constitution.load import load_constitution
from cai_lib.constitution.model import ConstitutionError
from cai_lib.constitution.templates import parse_output
from cai_lib.feedback.label_metrics import normalise_choice
from cai_lib.sources.eval_data import EvalDataError, read_hh_pairs, read_hhh
from cai_lib.sources.prompts import MAX_PROMPT_CHARS, SourceError, read_prompt_source

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIR = Path(tempfile.mkdtemp(prefix="cai-fuzz-"))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                    max_leaves=12)
# records that look like ours: the known keys, with values of any JSON type
RECORD = st.dictionaries(st.sampled_from(["prompt", "text", "category", "tags", "kind", "chosen", "rejected",
                                          "transcript", "rating", "is_upworker", "task_description"]),
                         JSON | st.text(alphabet=st.characters(), max_size=60), max_size=5)


def write(name: str, data: bytes) -> Path:
    path = DIR / name
    path.write_bytes(data)
    return path


@FAST
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".json", ".csv", ".jsonl.gz", ".csv.gz"]))
def test_prompt_readers_take_any_bytes(data, ext):
    path = write(f"any{ext}", gzip.compress(data) if ext.endswith(".gz") and data[:1] != b"\x1f" else data)
    try:
        read = read_prompt_source(path, max_bad_fraction=1.0)
    except SourceError:
        return
    for rec in read.records:
        assert isinstance(rec.text, str) and rec.text.strip() and len(rec.text) <= MAX_PROMPT_CHARS


@FAST
@given(st.lists(RECORD, min_size=1, max_size=6))
def test_prompt_readers_take_any_records(records):
    path = write("records.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    try:
        read = read_prompt_source(path, max_bad_fraction=1.0)
    except SourceError:
        return
    assert len(read.records) + len(read.rejected) == len(records)
    for rec in read.records:
        assert isinstance(rec.text, str) and rec.kind in (None, "red_team", "helpful")
        json.dumps(rec.meta)   # meta is stored as JSON


@FAST
@given(st.lists(RECORD | JSON, min_size=1, max_size=6))
def test_eval_readers_take_any_records(records):
    path = write("eval.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    for reader in (lambda p: read_hh_pairs(p), read_hhh):
        try:
            reader(path)
        except EvalDataError:
            pass


@FAST
@given(st.text(max_size=300) | JSON.map(lambda v: json.dumps(v)))
def test_the_constitution_loader_takes_any_text(text):
    for ext in (".yaml", ".json"):
        path = write(f"c{ext}", text.encode("utf-8", "surrogatepass"))
        try:
            c = load_constitution(path)
        except ConstitutionError:
            continue
        assert c.critique_revision or c.comparison


@FAST
@given(st.dictionaries(st.sampled_from(["id", "version", "description", "critique_revision", "comparison",
                                        "few_shot", "templates"]), JSON, max_size=7))
def test_the_constitution_loader_takes_any_mapping(doc):
    path = write("m.yaml", json.dumps(doc).encode())   # JSON is YAML
    try:
        load_constitution(path)
    except ConstitutionError:
        pass


@FAST
@given(st.sampled_from(["initial_response", "critique", "revision", "helpful_response", "cot"]), st.text())
def test_output_parsers_return_a_stripped_string_for_any_text(kind, text):
    out = parse_output(kind, text)
    assert isinstance(out, str) and out == out.strip() and len(out) <= len(text)


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True))
def test_choice_normalisation_gives_a_probability_or_says_why(a, b):
    invalid = any(math.isnan(x) or x == math.inf for x in (a, b)) or a == b == -math.inf
    if invalid:
        with pytest.raises(ValueError, match="logprob"):
            normalise_choice(a, b)
        return
    p = normalise_choice(a, b)
    top = max(a, b)                                   # finite here: at most one of them is -inf
    want = math.exp(a - top) / (math.exp(a - top) + math.exp(b - top))   # the two-way softmax, written out
    assert p == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert p + normalise_choice(b, a) == pytest.approx(1.0)          # swapping the choices mirrors it
    assert (p > 0.5) == (a > b) or abs(a - b) < 1e-15 * max(1.0, abs(a))   # the likelier choice wins
