"""Constitutions: versioned principles for the SL (critique/revision) and RL (comparison) stages.

    from cai_lib.constitution.load import load_constitution
    c = load_constitution("constitutions/default.yaml")      # our YAML format
    c.sha256, c.critique_principle("harmful-content").critique
    load_constitution("CritiqueRevisionInstructions.json")   # the paper's published JSON (one half)

The YAML format is documented in constitutions/default.yaml. Every problem in a file is a
ConstitutionError that names the file, the entry, the field and the fix. `sha256` hashes the
canonical JSON of the content only, so comments and reformatting keep it and any text change
moves it; it is what events record as `constitution_sha`.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from cai_lib.sources.prompts import hidden_character

# Placeholders each prompt template must use (all of them, and no others). The prompts module
# imports this dict, so a constitution override and the default templates obey the same rule.
TEMPLATE_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "initial": frozenset({"prompt"}),
    "critique": frozenset({"request"}),
    "revision": frozenset({"request"}),
    "comparison": frozenset({"conversation", "principle", "response_a", "response_b"}),
    "cot": frozenset({"conversation", "principle", "response_a", "response_b"}),
}
ID_PATTERN = re.compile(r"[a-z0-9._-]+")
_TOP_KEYS = ("id", "version", "description", "critique_revision", "comparison", "few_shot", "templates")
_CRITIQUE_KEYS = ("id", "critique", "revision", "tags")
_COMPARISON_KEYS = ("id", "text", "tags")
_FEW_SHOT_KEYS = ("critique_revision", "comparison")
_FS_CRITIQUE_KEYS = ("prompt", "response", "critique", "revision")
_FS_COMPARISON_KEYS = ("prompt", "response_a", "response_b", "answer")


class ConstitutionError(ValueError):
    """A constitution file or dict is wrong; the message says where and how to fix it."""


@dataclass(frozen=True)
class CritiquePrinciple:
    id: str
    critique: str  # critique request shown after the model's answer
    revision: str  # the matching revision request
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComparisonPrinciple:
    id: str
    text: str  # one question comparing two responses, followed by options (A)/(B)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class FewShotCritique:
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class FewShotComparison:
    prompt: str
    response_a: str
    response_b: str
    answer: str  # "A" or "B": the better response


@dataclass(frozen=True)
class Constitution:
    id: str
    version: str
    description: str
    critique_revision: tuple[CritiquePrinciple, ...]
    comparison: tuple[ComparisonPrinciple, ...]
    few_shot_critique: tuple[FewShotCritique, ...] = ()
    few_shot_comparison: tuple[FewShotComparison, ...] = ()
    templates: Mapping[str, str] = field(default_factory=dict)  # overrides only; read-only
    source: str = field(default="", compare=False)  # where it was loaded from; not in the sha
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        # Accept lists/dicts from callers, store immutable values, derive the content sha.
        for name in ("critique_revision", "comparison", "few_shot_critique", "few_shot_comparison"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "templates", MappingProxyType(dict(self.templates)))
        object.__setattr__(self, "sha256", content_sha256(self))

    def __hash__(self) -> int:  # the templates mapping is unhashable; the sha covers all content
        return hash(self.sha256)

    def critique_principle(self, pid: str) -> CritiquePrinciple:
        return self._find("critique_revision", pid)

    def comparison_principle(self, pid: str) -> ComparisonPrinciple:
        return self._find("comparison", pid)

    def _find(self, section: str, pid: str):
        found = [p for p in getattr(self, section) if p.id == pid]
        if not found:
            known = ", ".join(p.id for p in getattr(self, section)) or "(none)"
            raise KeyError(f"no {section} principle {pid!r} in constitution {self.id!r} "
                           f"({self.source or 'not loaded from a file'}); known ids: {known}")
        return found[0]


# --- pure helpers -------------------------------------------------------------------------

def template_fields(text: str) -> set[str]:
    """Named placeholders of a str.format template; ValueError for positional or odd fields.

    >>> sorted(template_fields("Q: {prompt} {{literal}} {request}"))
    ['prompt', 'request']
    >>> template_fields("{}")
    Traceback (most recent call last):
    ValueError: positional placeholder '{}' is not allowed; name it, e.g. '{prompt}'
    """
    names = set()
    for _, name, _, _ in string.Formatter().parse(text):  # raises ValueError on a lone '{'/'}'
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"positional placeholder '{{{name}}}' is not allowed; name it, e.g. '{{prompt}}'")
        if not name.isidentifier():
            raise ValueError(f"placeholder '{{{name}}}' must be a plain name (no '.', '[]'); write '{{{{' for a literal brace")
        names.add(name)
    return names


def template_problem(name: str, text: str) -> str | None:
    """Why `text` is not a valid override for template `name`, or None when it is.

    >>> template_problem("initial", "Human: {prompt}") is None
    True
    >>> print(template_problem("critique", "{prompt}"))
    missing placeholder(s) {request}; unknown placeholder(s) {prompt} (allowed: {request})
    """
    if name not in TEMPLATE_PLACEHOLDERS:
        return f"unknown template {name!r} (known: {', '.join(TEMPLATE_PLACEHOLDERS)})"
    try:
        found = template_fields(text)
    except ValueError as e:
        return str(e)
    need = TEMPLATE_PLACEHOLDERS[name]
    fmt = lambda s: ", ".join("{" + x + "}" for x in sorted(s))  # noqa: E731
    problems = []
    if need - found:
        problems.append(f"missing placeholder(s) {fmt(need - found)}")
    if found - need:
        problems.append(f"unknown placeholder(s) {fmt(found - need)} (allowed: {fmt(need)})")
    return "; ".join(problems) or None


def constitution_to_dict(c: Constitution) -> dict[str, Any]:
    """The content of `c` as plain data (every key present): what the sha and the YAML use."""
    return {
        "id": c.id, "version": c.version, "description": c.description,
        "critique_revision": [{"id": p.id, "critique": p.critique, "revision": p.revision,
                               "tags": list(p.tags)} for p in c.critique_revision],
        "comparison": [{"id": p.id, "text": p.text, "tags": list(p.tags)} for p in c.comparison],
        "few_shot": {
            "critique_revision": [{k: getattr(f, k) for k in _FS_CRITIQUE_KEYS} for f in c.few_shot_critique],
            "comparison": [{k: getattr(f, k) for k in _FS_COMPARISON_KEYS} for f in c.few_shot_comparison],
        },
        "templates": dict(sorted(c.templates.items())),
    }


def content_sha256(c: Constitution) -> str:
    """Hex sha256 of the canonical JSON of the content (not `source`, not YAML formatting)."""
    blob = json.dumps(constitution_to_dict(c), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- validation: dict -> Constitution -------------------------------------------------------

@dataclass
class _Checker:
    """Validates one parsed document; every error names the source, the entry and the fix."""

    source: str

    def fail(self, where: str, problem: str, fix: str) -> ConstitutionError:
        return ConstitutionError(f"{self.source}: {where}: {problem}. Fix: {fix}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}",
                            f"write it as 'key: value' lines with the keys {', '.join(allowed)}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}",
                            f"remove or rename them; allowed keys: {', '.join(allowed)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise self.fail(where, f"missing required key(s) {', '.join(map(repr, missing))}",
                            f"add {', '.join(k + ': ...' for k in missing)}")
        return value

    def text(self, value: Any, where: str, key: str, strip: bool = True) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"field {key!r} must be a string, got {type(value).__name__} {value!r}",
                            f'quote it, e.g. {key}: "..."')
        if not value.strip():
            raise self.fail(where, f"field {key!r} is empty", f"write the {key} text, or remove the entry")
        hidden = hidden_character(value)   # the rule ingest applies to prompts: the model reads these too
        if hidden:
            raise self.fail(where, f"field {key!r} holds {hidden}, which hides or reorders what a reader sees "
                                   "(prompts holding one are quarantined at ingest)", "remove it from the file")
        # Surrounding whitespace carries no meaning (YAML '>' vs '>-' vs quotes); templates keep theirs.
        return value.strip() if strip else value

    def ident(self, value: Any, where: str) -> str:
        pid = self.text(value, where, "id")
        if not ID_PATTERN.fullmatch(pid):
            raise self.fail(where, f"id {pid!r} has characters outside [a-z0-9._-]",
                            "use only lower-case letters, digits, '.', '_' and '-', e.g. 'harmful-content'")
        return pid

    def tags(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
            raise self.fail(where, f"field 'tags' must be a list of non-empty strings, got {value!r}",
                            "write tags: [harm, ethics]")
        return tuple(t.strip() for t in value)

    def entries(self, value: Any, where: str) -> list:
        if value is not None and not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {type(value).__name__}",
                            "write one '- ' item per entry (or [] for none)")
        return value or []

    def principles(self, value: Any, section: str, keys: tuple[str, ...], texts: tuple[str, ...]) -> list[dict]:
        out, seen = [], {}
        for i, raw in enumerate(self.entries(value, section)):
            where = f"{section}[{i}]"
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                where += f" (id {raw['id']!r})"
            self.mapping(raw, where, keys, ("id",) + texts)
            pid = self.ident(raw["id"], where)
            if pid in seen:
                raise self.fail(where, f"duplicate id {pid!r}, already used by {section}[{seen[pid]}]",
                                "give each principle in the list its own id")
            seen[pid] = i
            item = {"id": pid, **{k: self.text(raw[k], where, k) for k in texts}}
            item["tags"] = self.tags(raw["tags"], where) if "tags" in raw else ()
            out.append(item)
        return out


    def examples(self, value: Any, section: str, cls: type, keys: tuple[str, ...]) -> list:
        out = []
        for i, raw in enumerate(self.entries(value, section)):
            self.mapping(raw, f"{section}[{i}]", keys, keys)
            out.append(cls(*(self.text(raw[k], f"{section}[{i}]", k) for k in keys)))
        return out


def constitution_from_dict(data: Any, source: str = "<dict>") -> Constitution:
    """Validate parsed YAML/JSON content (our format) and build a Constitution."""
    ck = _Checker(source)
    top = ck.mapping(data, "top level", _TOP_KEYS, ("id", "version", "description", "critique_revision"))
    cid = ck.ident(top["id"], "top level")
    version = ck.text(top["version"], "top level", "version")
    description = ck.text(top["description"], "top level", "description")
    crit = ck.principles(top["critique_revision"], "critique_revision", _CRITIQUE_KEYS, ("critique", "revision"))
    comp = ck.principles(top.get("comparison"), "comparison", _COMPARISON_KEYS, ("text",))
    if not crit and not comp:
        raise ck.fail("top level", "the constitution has no principles (critique_revision and comparison are both empty)",
                      "add at least one critique_revision pair (SL stage) or comparison principle (RL stage)")
    fs = ck.mapping(top.get("few_shot") or {}, "few_shot", _FEW_SHOT_KEYS, ())
    fs_crit = ck.examples(fs.get("critique_revision"), "few_shot.critique_revision", FewShotCritique, _FS_CRITIQUE_KEYS)
    fs_comp = ck.examples(fs.get("comparison"), "few_shot.comparison", FewShotComparison, _FS_COMPARISON_KEYS)
    for i, ex in enumerate(fs_comp):
        if ex.answer not in ("A", "B"):
            raise ck.fail(f"few_shot.comparison[{i}]", f"answer must be 'A' or 'B', got {ex.answer!r}",
                          "write answer: A when response_a is better, answer: B otherwise")
    templates = top.get("templates") or {}
    if not isinstance(templates, dict):
        raise ck.fail("templates", f"expected a mapping, got {type(templates).__name__}",
                      f"write 'name: template' lines; names: {', '.join(TEMPLATE_PLACEHOLDERS)}")
    for name, text in templates.items():
        ck.text(text, f"templates.{name}", str(name), strip=False)
        problem = template_problem(name, text)
        if problem:
            need = ", ".join("{" + x + "}" for x in sorted(TEMPLATE_PLACEHOLDERS.get(name, ())))
            raise ck.fail(f"templates.{name}", problem,
                          f"use exactly the placeholders {need} (write '{{{{' and '}}}}' for literal braces)"
                          if need else f"use one of the template names {', '.join(TEMPLATE_PLACEHOLDERS)}")
    return Constitution(
        id=cid, version=version, description=description,
        critique_revision=tuple(CritiquePrinciple(**p) for p in crit),
        comparison=tuple(ComparisonPrinciple(**p) for p in comp),
        few_shot_critique=tuple(fs_crit), few_shot_comparison=tuple(fs_comp),
        templates=dict(templates), source=source)
