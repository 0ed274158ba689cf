"""Import the constitution published with the CAI paper (Bai et al. 2022, arXiv 2212.08073).

The paper's repository (anthropics/ConstitutionalHarmlessnessPaper, prompts/) ships two files:
- CritiqueRevisionInstructions.json: {"harmful0": {"prompt": ["\\n\\nCritiqueRequest: ...\\n\\nCritique:"],
  "edit_request": "\\n\\nRevisionRequest: ...\\n\\nRevision:"}, ...}  -> critique_revision pairs
- RLMadisonInstructions.json: ["\\nPlease choose ... Options:", ...]  -> comparison principles rl0..rl15

The frames (CritiqueRequest:/Critique:, RevisionRequest:/Revision:, trailing Options:) belong
to the paper's prompt layout, which our templates supply, so they are stripped here. The files
are not vendored: pass their paths (or the parsed JSON).

    from cai_lib.constitution.paper import constitution_from_paper
    from cai_lib.constitution.load import load_constitution
    c = constitution_from_paper(critique_json="prompts/CritiqueRevisionInstructions.json",
                                comparison_json="prompts/RLMadisonInstructions.json")
    half = load_constitution("prompts/RLMadisonInstructions.json")   # comparison half only
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cai_lib.constitution.model import Constitution, ConstitutionError, constitution_from_dict

PAPER = "Bai et al. 2022, 'Constitutional AI: Harmlessness from AI Feedback' (arXiv 2212.08073)"
_CRITIQUE_FRAME = re.compile(r"\s*CritiqueRequest:\s*(?P<text>.*?)\s*Critique:\s*", re.DOTALL)
_REVISION_FRAME = re.compile(r"\s*RevisionRequest:\s*(?P<text>.*?)\s*Revision:\s*", re.DOTALL)
_OPTIONS_TAIL = re.compile(r"\s*Options:\s*$")


def strip_frame(text: str, frame: re.Pattern) -> str | None:
    r"""The request inside a paper frame, or None if `text` is not in that frame.

    >>> strip_frame("\n\nCritiqueRequest: Is it rude?\n\nCritique:", _CRITIQUE_FRAME)
    'Is it rude?'
    >>> strip_frame("Is it rude?", _CRITIQUE_FRAME) is None
    True
    """
    m = frame.fullmatch(text)
    return m.group("text") if m and m.group("text") else None


def strip_options(text: str) -> str | None:
    r"""A comparison principle without its trailing 'Options:', or None if it has none.

    >>> strip_options("\nWhich response is less harmful? Options:")
    'Which response is less harmful?'
    """
    m = _OPTIONS_TAIL.search(text)
    return text[: m.start()].strip() or None if m else None


def critique_entries(data: Any, source: str) -> list[dict]:
    """CritiqueRevisionInstructions.json content -> our critique_revision entries (ids = keys)."""
    if not isinstance(data, dict) or not data:
        raise ConstitutionError(f"{source}: expected an object keyed harmful0, harmful1, ... "
                                f"(CritiqueRevisionInstructions.json). Fix: pass that file")
    out = []
    for key, value in data.items():
        where = f"{source}: entry {key!r}"
        if not (isinstance(value, dict) and set(value) == {"prompt", "edit_request"}):
            raise ConstitutionError(f"{where}: expected {{\"prompt\": [str], \"edit_request\": str}}, got "
                                    f"{str(value)[:80]!r}. Fix: pass CritiqueRevisionInstructions.json unchanged")
        prompt, edit = value["prompt"], value["edit_request"]
        if not (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)):
            raise ConstitutionError(f"{where}: field 'prompt' must be a list holding one string. "
                                    f"Fix: pass CritiqueRevisionInstructions.json unchanged")
        critique = strip_frame(prompt[0], _CRITIQUE_FRAME)
        revision = strip_frame(edit, _REVISION_FRAME) if isinstance(edit, str) else None
        if critique is None or revision is None:
            field = "prompt[0]" if critique is None else "edit_request"
            raise ConstitutionError(f"{where}: field {field!r} is not in the paper's "
                                    f"'CritiqueRequest: ... Critique:' / 'RevisionRequest: ... Revision:' "
                                    f"frame. Fix: pass CritiqueRevisionInstructions.json unchanged")
        out.append({"id": key, "critique": critique, "revision": revision})
    return out


def comparison_entries(data: Any, source: str) -> list[dict]:
    """RLMadisonInstructions.json content -> our comparison entries rl0, rl1, ..."""
    if not (isinstance(data, list) and data and all(isinstance(s, str) for s in data)):
        raise ConstitutionError(f"{source}: expected a list of strings (RLMadisonInstructions.json). "
                                f"Fix: pass that file")
    out = []
    for i, s in enumerate(data):
        text = strip_options(s)
        if text is None:
            raise ConstitutionError(
                f"{source}: entry [{i}]: does not end with 'Options:' as every principle in "
                f"RLMadisonInstructions.json does (starts {s[:60]!r}). Fix: pass RLMadisonInstructions.json; "
                f"few-shot files such as CritiqueRevisionFewShotPrompts.json are not principles")
        out.append({"id": f"rl{i}", "text": text})
    return out


def _read(arg: Any) -> tuple[Any, str]:
    """(parsed JSON, source name) from a path or already-parsed content."""
    if isinstance(arg, (str, Path)):
        p = Path(arg)
        if not p.is_file():
            raise ConstitutionError(f"{p}: file not found. Fix: point to the paper's prompts/ folder "
                                    f"(see /work/shared/data/README.md, section prompts/)")
        try:
            return json.loads(p.read_text(encoding="utf-8")), str(p)
        except json.JSONDecodeError as e:
            raise ConstitutionError(f"{p}: JSON syntax error at line {e.lineno}, column {e.colno}: "
                                    f"{e.msg}. Fix: pass the paper's file unchanged") from e
    return arg, "<paper json>"


def constitution_from_paper(critique_json: Any = None, comparison_json: Any = None, *,
                            id: str = "anthropic-paper-2022", version: str = "2022-12") -> Constitution:
    """The paper's constitution from its JSON files (paths or parsed content); either half may be None."""
    if critique_json is None and comparison_json is None:
        raise ConstitutionError("constitution_from_paper: no input. Fix: pass critique_json= "
                                "(CritiqueRevisionInstructions.json) and/or comparison_json= "
                                "(RLMadisonInstructions.json)")
    crit, comp, sources = [], [], []
    if critique_json is not None:
        data, src = _read(critique_json)
        crit = critique_entries(data, src)
        sources.append(src)
    if comparison_json is not None:
        data, src = _read(comparison_json)
        comp = comparison_entries(data, src)
        sources.append(src)
    halves = " and ".join(h for h, on in (("critique/revision pairs", crit), ("comparison principles", comp)) if on)
    doc = {"id": id, "version": version,
           "description": f"The {halves} published with {PAPER}, with the prompt frames stripped.",
           "critique_revision": crit, "comparison": comp}
    return constitution_from_dict(doc, source=" + ".join(sources))


def constitution_from_paper_json(path: str | Path) -> Constitution:
    """One paper JSON file; which half it is is detected from its shape."""
    data, src = _read(path)
    if isinstance(data, dict):
        return constitution_from_paper(critique_json=path)
    if isinstance(data, list) and all(isinstance(s, str) for s in data):
        return constitution_from_paper(comparison_json=path)
    raise ConstitutionError(
        f"{src}: this JSON is neither CritiqueRevisionInstructions.json (an object of "
        f"{{prompt, edit_request}}) nor RLMadisonInstructions.json (a list of strings). "
        f"Fix: pass one of those two files, or write a .yaml constitution")
