"""Readers for the evaluation files in shared/data (see shared/data/README.md).

  read_hh_pairs  HH-RLHF preference pairs (harmless-base / helpful-base test.jsonl.gz) ->
                 HumanPair(context turns, chosen reply, rejected reply); quirky rows come
                 back in a second list with a reason, never silently dropped.
  read_hhh       the 438 binary HHH comparisons (evals/438HHHEvaluations.jsonl) -> HHHItem.

    pairs, rejected = read_hh_pairs("../shared/data/hh-rlhf/harmless-base/test.jsonl.gz",
                                    limit=200, seed=0)
    items = read_hhh("../shared/data/constitutional-harmlessness-paper/evals/"
                     "438HHHEvaluations.jsonl")
"""
from __future__ import annotations

import gzip
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from cai_lib.sources.prompts import split_dialogue

__all__ = ["EvalDataError", "HumanPair", "HHHItem", "ASSISTANT", "split_pair",
           "read_hh_pairs", "read_hhh"]

ASSISTANT = "\n\nAssistant:"      # the README splits prompt/response at the LAST of these
_GZIP_MAGIC = b"\x1f\x8b"


class EvalDataError(ValueError):
    """An evaluation file that cannot be read: names the file (and row/field) and the fix."""


@dataclass(frozen=True)
class HumanPair:
    """A human preference comparison; chosen and rejected continue the same context."""
    prompt: str                       # the dialogue up to and including the last "\n\nAssistant:"
    context: list[tuple[str, str]]    # turns before the final reply: [('human', t), ...]
    chosen: str                       # the final assistant reply humans preferred (stripped)
    rejected: str                     # the other final reply (stripped)
    source: str                       # str(path) as given
    row: int                          # 0-based line index in the file


@dataclass(frozen=True)
class HHHItem:
    """One binary HHH comparison (Askell et al. 2021) as a multiple-choice frame."""
    prompt: str                       # the frame with options (A)/(B), ending "The answer is:"
    correct: str                      # " (A)" or " (B)", as in the file's `corrects`
    incorrect: str                    # the other label
    text_correct: str                 # the whole dialogue with the better reply
    text_incorrect: str               # the whole dialogue with the worse reply
    row: int                          # 0-based line index in the file


# ---------------------------------------------------------------- file reading

def _read_jsonl(path) -> list[tuple[int, dict]]:
    """[(line index, object)] for each non-blank line; gzip decided by the magic bytes."""
    source, p = str(path), Path(path)
    if not p.is_file():
        what = "no such file" if not p.exists() else "not a regular file"
        raise EvalDataError(f"{source}: {what}. Fix: check the path; the shared evaluation "
                            "files live under shared/data (see shared/data/README.md).")
    rows: list[tuple[int, dict]] = []
    try:
        with open(p, "rb") as fh:
            is_gz = fh.read(2) == _GZIP_MAGIC
        with (gzip.open(p, "rb") if is_gz else open(p, "rb")) as fh:
            for i, raw in enumerate(fh):
                if not raw.strip():
                    continue                            # blank lines are not records
                try:
                    obj = json.loads(raw.decode("utf-8-sig" if i == 0 else "utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise EvalDataError(f"{source}: row {i} (line {i + 1}) is not valid "
                                        f"UTF-8 JSON ({e}). Fix: repair or re-download the "
                                        "file; it must be JSON Lines.") from None
                if not isinstance(obj, dict):
                    raise EvalDataError(f"{source}: row {i} (line {i + 1}) is a JSON "
                                        f"{type(obj).__name__}, not an object. Fix: write one "
                                        "JSON object per line.")
                rows.append((i, obj))
    except OSError as e:                                # permissions, bad gzip, truncation
        raise EvalDataError(f"{source}: cannot be read ({e}). Fix: check the file's "
                            "permissions, or re-download it if it is corrupt.") from None
    except (EOFError, zlib.error) as e:
        raise EvalDataError(f"{source}: corrupt or truncated gzip ({e}). "
                            "Fix: re-download the file.") from None
    if not rows:
        raise EvalDataError(f"{source}: holds no records. Fix: point at a non-empty JSONL file.")
    return rows


def _field(obj: dict, key: str, kind: type, source: str, row: int):
    value = obj.get(key)
    if not isinstance(value, kind):
        got = "missing" if key not in obj else f"a {type(value).__name__}"
        raise EvalDataError(f"{source}: row {row} field '{key}' is {got}, expected a "
                            f"{kind.__name__}. Fix: is this the right file? (see "
                            "shared/data/README.md for each file's fields)")
    return value


# ---------------------------------------------------------------- HH-RLHF pairs

def split_pair(dialogue: str) -> tuple[str, str] | None:
    """(prompt up to and including the last "\\n\\nAssistant:", reply stripped), or None.

    >>> split_pair("\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant:  Ciao ")
    ('\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye\\n\\nAssistant:', 'Ciao')
    >>> split_pair("\\n\\nHuman: no reply marker") is None
    True
    """
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:].strip()


def _pair(obj: dict, source: str, row: int) -> HumanPair | str:
    """A HumanPair, or the reason (str) the row cannot be one."""
    chosen = _field(obj, "chosen", str, source, row)
    rejected = _field(obj, "rejected", str, source, row)
    sc, sr = split_pair(chosen), split_pair(rejected)
    missing = [k for k, s in (("chosen", sc), ("rejected", sr)) if s is None]
    if missing:
        return f"no '\\n\\nAssistant:' marker in {' and '.join(missing)}"
    reasons = []
    if sc[0] != sr[0]:
        reasons.append("prefixes differ between chosen and rejected")
    reasons += [f"{k} response is empty" for k, s in (("chosen", sc), ("rejected", sr)) if not s[1]]
    if sc[1] and sc[1] == sr[1]:
        reasons.append("chosen == rejected")
    if reasons:
        return "; ".join(reasons)
    turns = split_dialogue(sc[0])
    context = turns[:-1] if turns and turns[-1] == ("assistant", "") else turns
    return HumanPair(sc[0], context, sc[1], sr[1], source, row)


def read_hh_pairs(path, *, limit: int | None = None,
                  seed: int | None = None) -> tuple[list[HumanPair], list[dict]]:
    """(valid pairs, rejected rows as {"row": i, "reason": ...}) from an HH-RLHF file.

    Every row ends up in exactly one list, so len(pairs) + len(rejected) == rows when no
    limit is given. `limit` keeps that many valid pairs: the first ones without `seed`, a
    seeded random sample with it (same seed, same sample; returned in file order); a limit
    larger than the number of valid pairs keeps them all; seed without limit changes
    nothing. `rejected` always lists every
    rejected row of the file, whatever the limit.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    source = str(path)
    pairs: list[HumanPair] = []
    rejected: list[dict] = []
    for row, obj in _read_jsonl(path):
        got = _pair(obj, source, row)
        if isinstance(got, HumanPair):
            pairs.append(got)
        else:
            rejected.append({"row": row, "reason": got})
    return _sample(pairs, limit, seed), rejected


def _sample(pairs: list, limit: int | None, seed: int | None) -> list:
    """`limit` of them: the first ones without `seed`, a seeded sample (in file order) with it."""
    if limit is None or limit >= len(pairs):
        return pairs
    if seed is None:
        return pairs[:limit]
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


# ---------------------------------------------------------------- HHH comparisons

def pair_prompt(pair: HumanPair) -> str:
    """The pair's prompt as ingest keys it: its first human turn, whitespace-normalised."""
    from cai_lib.ids import normalise_text
    return normalise_text(next((t for role, t in pair.context if role == "human"), ""))


def read_disjoint_pairs(path, *, limit: int | None, seed: int | None,
                        exclude: set[str]) -> tuple[list[HumanPair], list[dict], int]:
    """read_hh_pairs, but the seeded sample is drawn only from pairs whose prompt (`pair_prompt`) is
    not in `exclude` (the lake's training prompts): (pairs, rejected rows, pairs excluded). So an
    evaluation file that also fed ingest evaluates on a disjoint, seeded split of it."""
    pairs, rejected = read_hh_pairs(path)
    kept = [p for p in pairs if pair_prompt(p) not in exclude]
    return _sample(kept, limit, seed), rejected, len(pairs) - len(kept)


def _label(obj: dict, key: str, source: str, row: int) -> str:
    value = _field(obj, key, list, source, row)
    if len(value) != 1 or not isinstance(value[0], str):
        raise EvalDataError(f"{source}: row {row} field '{key}' must be a list of one label "
                            f"string such as [\" (A)\"], got {value!r:.80}. Fix: is this the "
                            "438HHHEvaluations.jsonl file?")
    return value[0]


def read_hhh(path) -> list[HHHItem]:
    """The binary HHH comparisons, one HHHItem per line; any malformed row is an error
    (the file is small and curated: a bad row means the wrong or a damaged file)."""
    source = str(path)
    return [HHHItem(prompt=_field(obj, "prompt", str, source, row),
                    correct=_label(obj, "corrects", source, row),
                    incorrect=_label(obj, "incorrects", source, row),
                    text_correct=_field(obj, "text_correct", str, source, row),
                    text_incorrect=_field(obj, "text_incorrect", str, source, row),
                    row=row)
            for row, obj in _read_jsonl(path)]
