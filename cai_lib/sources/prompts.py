"""Read user prompt files into PromptRecords: pure Python, no Spark, no lake.

Accepted files: .jsonl .jsonl.gz .json .json.gz .csv .csv.gz. A .json/.jsonl file may hold
one JSON array (the official red_team_attempts.jsonl is one, despite its name) or JSON Lines;
the first non-space character decides. The records may be
  hh-rlhf        preference pairs {"chosen", "rejected"}: prompt = first human turn of chosen
  red-team       red-team attempts {"transcript", ...}: first human turn, kind 'red_team'
  prompts-jsonl  plain prompts {"prompt" or "text", optional "category", "tags", "kind", ...}
  prompts-csv    the same as a CSV file with a header row
Row problems come back as RejectedRow, never dropped. A file that cannot be trusted as a
whole raises SourceError; everything is read first, so callers can write all-or-nothing:
    read = read_prompt_source("data/demo/red_team_prompts.jsonl")  # .records, .rejected
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

ACCEPTED_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz")
KINDS = ("red_team", "helpful")
# Red-team attempt fields worth keeping next to the prompt (the key `task_descripton_...`
# really is misspelt in Anthropic's file).
RED_TEAM_META = ("rating", "min_harmlessness_score_transcript", "task_description",
                 "task_descripton_harmlessness_score", "model_type", "num_params",
                 "red_team_member_id", "is_upworker")
# Their types in Anthropic's file; a value of another type is a broken or hostile row, not meta.
_NUMBER = (int, float)
RED_TEAM_META_TYPES = {"rating": _NUMBER, "min_harmlessness_score_transcript": _NUMBER, "task_description": str,
                       "task_descripton_harmlessness_score": _NUMBER, "model_type": str, "num_params": (str, int),
                       "red_team_member_id": (int, str), "is_upworker": bool}
PLAIN_FIELDS = ("prompt", "text", "category", "tags", "kind")
MAX_PAYLOAD = 2000
MAX_PROMPT_CHARS = 4000   # longer "prompts" are pasted documents, not requests (the prompts gate's bound too)
# C0 controls but tab/newline/CR, DEL, bidi embeddings/overrides/isolates: they hide or reorder text
_HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]")
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
# Turn markers include the leading blank line: a bare "Human:" also occurs inside turns.
# The trailing space is optional only at a line end or the end (an empty final turn).
_TURN = re.compile(r"\n\n(Human|Assistant):(?: |(?=\n)|$)")


class SourceError(ValueError):
    """A prompt file that cannot be read at all. The message names the file, the row and
    field where relevant, and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    text: str                 # the prompt, stripped
    source: str               # str(path) as given
    source_row: int           # 0-based: line (JSONL), element (JSON array), data row (CSV)
    kind: str | None          # 'red_team' | 'helpful' when the file says so, else None
    category: str | None
    tags: tuple[str, ...]
    meta: dict                # other useful fields, JSON-serialisable


@dataclass(frozen=True)
class RejectedRow:
    source: str
    source_row: int
    field: str | None
    reason: str
    payload: str              # the raw line/record text, at most MAX_PAYLOAD chars


@dataclass
class SourceRead:
    path: str
    format: str               # 'hh-rlhf' | 'red-team' | 'prompts-jsonl' | 'prompts-csv'
    records: list[PromptRecord]
    rejected: list[RejectedRow]


class _Reject(Exception):
    """One row's problem; becomes a RejectedRow."""
    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


# ---------------------------------------------------------------- dialogues

def split_dialogue(dialogue: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF style dialogue into (role, text) turns, texts stripped.

    Splits only on "\\n\\nHuman: " and "\\n\\nAssistant: " (a leading "Human:" at the very
    start counts too); text before the first marker is ignored.

    >>> split_dialogue("\\n\\nHuman: Hi there\\n\\nAssistant: Hello! How can I help?")
    [('human', 'Hi there'), ('assistant', 'Hello! How can I help?')]
    >>> split_dialogue("\\n\\nHuman: My note says Human: be kind\\n\\nAssistant:")
    [('human', 'My note says Human: be kind'), ('assistant', '')]
    >>> split_dialogue("Human: no leading blank line\\n\\nAssistant: ok")
    [('human', 'no leading blank line'), ('assistant', 'ok')]
    >>> split_dialogue("no markers at all")
    []
    """
    if not isinstance(dialogue, str):
        raise TypeError(f"dialogue must be a str, got {type(dialogue).__name__}")
    stripped = dialogue.lstrip()
    if stripped.startswith(("Human:", "Assistant:")):
        dialogue = "\n\n" + stripped      # files that lost the leading blank line
    parts = _TURN.split(dialogue)
    return [(role.lower(), text.strip()) for role, text in zip(parts[1::2], parts[2::2])]


def first_human_turn(dialogue: str) -> str:
    """The text of the first Human turn; ValueError if there is none or it is empty.

    >>> first_human_turn("\\n\\nHuman: What is 2+2?\\n\\nAssistant: 4\\n\\nHuman: And 3+3?")
    'What is 2+2?'
    >>> first_human_turn("\\n\\nAssistant: Hello")
    Traceback (most recent call last):
    ...
    ValueError: dialogue has no Human turn (expected a "\\n\\nHuman: " marker)
    """
    for role, text in split_dialogue(dialogue):
        if role == "human":
            if not text:
                raise ValueError("the first Human turn is empty")
            return text
    raise ValueError('dialogue has no Human turn (expected a "\\n\\nHuman: " marker)')


# ---------------------------------------------------------------- file reading

def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(ACCEPTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise SourceError(f"{path}: unknown file type; accepted extensions are "
                      f"{', '.join(ACCEPTED_EXTENSIONS)}. Fix: rename or convert the file.")


def _open_binary(path: Path, source: str):
    """Open as a byte stream, decompressing .gz on the fly; check the gzip magic first."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    is_gz = path.name.lower().endswith(".gz")
    if is_gz and magic != _GZIP_MAGIC:
        raise SourceError(f"{source}: named .gz but is not gzip-compressed. "
                          "Fix: drop the .gz suffix if it is plain text, or re-compress it.")
    if not is_gz and magic == _GZIP_MAGIC:
        raise SourceError(f"{source}: is gzip-compressed but not named .gz. Fix: add .gz.")
    return gzip.open(path, "rb") if is_gz else open(path, "rb")   # gzip streams


def _payload(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return text.rstrip("\r\n")[:MAX_PAYLOAD]


def _parse_line(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Reject(None, f"line is not valid UTF-8 (byte {e.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _Reject(None, f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path, source: str) -> tuple[str, list]:
    """('lines' | 'array', [(row, value or _Reject, payload)])."""
    items: list = []
    with _open_binary(path, source) as fh:
        lines = iter(fh)
        for i, raw in enumerate(lines):
            raw = raw.removeprefix(_BOM) if i == 0 else raw
            if not raw.strip():
                continue                    # blank lines are not records
            if not items and raw.lstrip().startswith(b"["):
                # one JSON array; the leading newlines keep its line numbers in errors
                return "array", _parse_array(b"\n" * i + raw + b"".join(lines), source)
            items.append((i, _parse_line(raw), _payload(raw)))
    return "lines", items


def _parse_array(data: bytes, source: str) -> list:
    try:
        values = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise SourceError(
            f"{source}: starts with '[' so it is read as one JSON array, but it does not "
            f"parse: {e.msg} at line {e.lineno} column {e.colno}. Fix the JSON there, or "
            "write JSON Lines (one object per line, no surrounding [ ]).") from None
    return [(i, v, _payload(json.dumps(v, ensure_ascii=False))) for i, v in enumerate(values)]


def _read_csv(path: Path, source: str) -> list:
    """[(row, dict or _Reject, payload)] for each non-blank data row."""
    items: list = []
    with _open_binary(path, source) as fb, \
            io.TextIOWrapper(fb, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{source}: empty CSV (no header row). Fix: add a header "
                                  "row with a 'prompt' or 'text' column.")
            cols = [c.strip() for c in header]
            if "prompt" not in cols and "text" not in cols:
                raise SourceError(f"{source}: the CSV header has no 'prompt' or 'text' column "
                                  f"(columns found: {cols}). Fix: rename the prompt column.")
            for i, row in enumerate(reader):
                if not any(cell.strip() for cell in row):
                    continue                # blank rows are not records
                out = io.StringIO()
                csv.writer(out).writerow(row)
                payload = _payload(out.getvalue())
                if len(row) > len(cols):
                    items.append((i, _Reject(None, f"row has {len(row)} cells but the header "
                                                   f"has {len(cols)}"), payload))
                    continue
                rec = {c: (v.strip() or None) for c, v in zip(cols, row)}
                items.append((i, rec, payload))
        except csv.Error as e:
            raise SourceError(f"{source}: CSV error at line {reader.line_num}: {e}. "
                              "Fix: check the quoting there.") from None
    return items


# ---------------------------------------------------------------- records

def _detect_format(items: list) -> str:
    for _, value, _ in items:
        if isinstance(value, dict):
            if "prompt" in value or "text" in value:
                return "prompts-jsonl"
            if "transcript" in value:
                return "red-team"
            if "chosen" in value:
                return "hh-rlhf"
    return "prompts-jsonl"


def _tags(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _Reject("tags", "tags must be a list of strings or a comma-separated string, "
                              f"got {json.dumps(value, ensure_ascii=False)[:100]}")
    return tuple(t.strip() for t in value if t.strip())


def _dialogue_prompt(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise _Reject(key, f"'{key}' is missing or not a string")
    try:
        return first_human_turn(value)
    except ValueError as e:
        raise _Reject(key, str(e)) from None


def _checked(text: str, field_name: str, max_chars: int) -> str:
    """The prompt text, or a _Reject naming the field and why (too long, hidden characters)."""
    if len(text) > max_chars:
        raise _Reject(field_name, f"'{field_name}' is {len(text)} characters, over max_prompt_chars={max_chars}. "
                                  "Fix: shorten it, or raise max_prompt_chars in params.yaml [ingest]")
    if hidden := hidden_character(text):
        raise _Reject(field_name, f"'{field_name}' holds {hidden}: control and bidi override characters are "
                                  "quarantined, not stored (they hide or reorder text). Fix: remove it from the file")
    return text


def hidden_character(text: str) -> str | None:
    """The first character of `text` that hides or reorders what a reader sees, with its code point and position
    (None if clean): one rule for the texts a model reads, prompts (quarantined) and constitutions (refused).

    >>> hidden_character("hi\\u202eereht"), hidden_character("a\\x00b"), hidden_character("line one\\n\\ttwo")
    ('RIGHT-TO-LEFT OVERRIDE (U+202E) at character 3', 'a control character (U+0000) at character 2', None)
    """
    m = _HIDDEN.search(text)
    return m and f"{unicodedata.name(m[0], 'a control character')} (U+{ord(m[0]):04X}) at character {m.start() + 1}"


def _red_team_meta(rec: dict) -> dict:
    meta = {k: rec[k] for k in RED_TEAM_META if k in rec}
    for key, value in meta.items():
        want = RED_TEAM_META_TYPES[key]
        if value is not None and (not isinstance(value, want) or isinstance(value, bool) and want is not bool):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise _Reject(key, f"'{key}' must be {names} (or null), got {json.dumps(value, ensure_ascii=False)[:100]}")
    return meta


def _to_record(fmt: str, rec, source: str, row: int, max_chars: int = MAX_PROMPT_CHARS) -> PromptRecord:
    record = _parse_record(fmt, rec, source, row)
    field_name = {"hh-rlhf": "chosen", "red-team": "transcript"}.get(fmt, "prompt")
    _checked(record.text, field_name, max_chars)
    return record


def _parse_record(fmt: str, rec, source: str, row: int) -> PromptRecord:
    if isinstance(rec, _Reject):            # the line did not even parse
        raise rec
    if not isinstance(rec, dict):
        raise _Reject(None, f"record is a JSON {type(rec).__name__}, not an object")
    if fmt == "hh-rlhf":
        return PromptRecord(_dialogue_prompt(rec, "chosen"), source, row, None, None, (), {})
    if fmt == "red-team":
        text = _dialogue_prompt(rec, "transcript")
        return PromptRecord(text, source, row, "red_team", None, _tags(rec.get("tags")), _red_team_meta(rec))
    key = "prompt" if rec.get("prompt") is not None or "text" not in rec else "text"
    text = rec.get(key)
    if text is None:
        raise _Reject("prompt", "no 'prompt' or 'text' field (or it is null)")
    if not isinstance(text, str):
        raise _Reject(key, f"'{key}' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise _Reject(key, f"'{key}' is empty")
    kind = rec.get("kind")
    if kind is not None and kind not in KINDS:
        raise _Reject("kind", f"kind must be one of {KINDS} or absent, got {kind!r}")
    category = rec.get("category")
    if category is not None and not isinstance(category, str):
        raise _Reject("category", f"category must be a string, got {type(category).__name__}")
    # A `text` field next to a winning `prompt` is kept as meta, not lost.
    keep_text = key == "prompt"             # a `text` beside a winning `prompt` is meta
    meta = {k: v for k, v in rec.items() if (k not in PLAIN_FIELDS or k == "text" and keep_text)
            and not (v is None and fmt == "prompts-csv")}      # empty CSV cells are None
    return PromptRecord(text.strip(), source, row, kind, (category or "").strip() or None,
                        _tags(rec.get("tags")), meta)


def _where(layout: str, row: int) -> str:
    return {"lines": "line", "array": "array element", "csv": "data row"}[layout] + f" {row + 1}"


def _first_problems(rejected: list[RejectedRow], layout: str, n: int = 3) -> str:
    return "; ".join(f"{_where(layout, r.source_row)}"
                     + (f" (field '{r.field}')" if r.field else "") + f": {r.reason}"
                     for r in rejected[:n])


def read_prompt_source(path, *, max_bad_fraction: float = 0.5, max_prompt_chars: int = MAX_PROMPT_CHARS) -> SourceRead:
    """Read one prompt file fully. Row problems (too long, hidden characters, wrong types included)
    -> `rejected`; file problems -> SourceError."""
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
    if max_prompt_chars < 1:
        raise ValueError(f"max_prompt_chars must be >= 1, got {max_prompt_chars!r}")
    source, p = str(path), Path(path)
    ext = _extension(p)
    if not p.exists():
        raise SourceError(f"{source}: no such file. Fix: check the path.")
    if not p.is_file():
        raise SourceError(f"{source}: not a regular file. Fix: point at one prompt file.")
    try:
        if ext.startswith(".csv"):
            fmt, layout, items = "prompts-csv", "csv", _read_csv(p, source)
        else:
            layout, items = _read_json(p, source)
            fmt = _detect_format(items)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise SourceError(f"{source}: corrupt or truncated gzip ({e}). "
                          "Fix: re-download or re-compress the file.") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{source}: not valid UTF-8 ({e.reason}). "
                          "Fix: re-save the file as UTF-8.") from None

    records: list[PromptRecord] = []
    rejected: list[RejectedRow] = []
    for row, value, payload in items:
        try:
            records.append(_to_record(fmt, value, source, row, max_prompt_chars))
        except _Reject as r:
            rejected.append(RejectedRow(source, row, r.field, r.reason, payload))

    total = len(records) + len(rejected)
    if total == 0:
        raise SourceError(f"{source}: holds no records (empty or only blank lines). "
                          "Fix: point at a file with at least one prompt.")
    if not records:
        hint = (" If it is one pretty-printed JSON object, write JSON Lines or a JSON array."
                if layout == "lines" else "")
        raise SourceError(f"{source}: none of its {total} records is usable (read as {fmt}); "
                          f"first problems: {_first_problems(rejected, layout)}. "
                          f"Fix: clean the file.{hint}")
    if len(rejected) / total > max_bad_fraction:
        raise SourceError(
            f"{source}: {len(rejected)} of {total} records rejected "
            f"({len(rejected) / total:.0%} > max_bad_fraction={max_bad_fraction}); first "
            f"problems: {_first_problems(rejected, layout)}. Fix: clean the file or raise "
            "max_bad_fraction.")
    return SourceRead(source, fmt, records, rejected)
