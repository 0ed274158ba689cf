"""Constitution files: load and validate our YAML (or one of the paper's JSON files), write YAML back.

    from cai_lib.constitution.load import load_constitution
    c = load_constitution("constitutions/default.yaml")      # our YAML format
    load_constitution("CritiqueRevisionInstructions.json")   # the paper's published JSON (one half)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cai_lib.constitution.model import Constitution, ConstitutionError, constitution_from_dict, constitution_to_dict
from cai_lib.constitution.paper import constitution_from_paper_json


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution: .yaml/.yml (our format) or .json (the paper's prompts)."""
    p = Path(path)
    if not p.is_file():
        raise ConstitutionError(f"{p}: file not found. Fix: check the path (shipped constitutions "
                                f"live in constitutions/*.yaml)")
    suffix = p.suffix.lower()
    if suffix == ".json":
        return constitution_from_paper_json(p)
    if suffix not in (".yaml", ".yml"):
        raise ConstitutionError(f"{p}: unsupported file type {suffix!r}. Fix: use a .yaml/.yml "
                                f"constitution or the paper's .json prompt file")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = getattr(e, "problem", None) or str(e)
        raise ConstitutionError(f"{p}: YAML syntax error at {at}: {problem}. Fix: correct the YAML "
                                f"there (quote texts containing ': ' or '#')") from e
    return constitution_from_dict(data, source=str(p))


class _YamlDumper(yaml.SafeDumper):
    """Multi-line texts as '|' blocks and tag lists inline, so a dump stays readable and diffable."""


_YamlDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
_YamlDumper.add_representer(tuple, lambda d, t: d.represent_sequence("tag:yaml.org,2002:seq", t, flow_style=True))


def constitution_to_yaml(c: Constitution) -> str:
    """YAML text in our format; load_constitution() of it gives the same sha256."""
    d = constitution_to_dict(c)  # optional parts left out when empty; the loader restores them
    for p in d["critique_revision"] + d["comparison"]:
        if p["tags"]:
            p["tags"] = tuple(p["tags"])  # a tuple dumps inline: tags: [harm, ethics]
        else:
            del p["tags"]
    if not any(d["few_shot"].values()):
        del d["few_shot"]
    if not d["templates"]:
        del d["templates"]
    header = f"# constitution {c.id} {c.version}, content sha256 {c.sha256}\n"
    return header + yaml.dump(d, Dumper=_YamlDumper, sort_keys=False, allow_unicode=True, width=100)
