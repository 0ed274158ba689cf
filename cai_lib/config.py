"""Typed job configs filled from `params.yaml` (the file dvc.yaml reads) and command-line flags.

A job config is a dataclass whose fields carry `metadata={"help": ...}`, composed from the
groups below so that a job has exactly the settings it uses. `load_config` merges, in order:
field defaults, the `common` section (only the keys the job has), the job's section, then
flags. The params file and the flags are checked alike, before a job starts Spark: an unknown key, a
value of the wrong type, a float that is not finite (argparse's `type=float` takes 'nan'), a value
outside a field's bounds (`opt(..., lo=, gt=, hi=, lt=)`) or not one of its `choices` is an error
naming where the value came from (the file and section, or the flag), the key, the value and the fix.
A flag the job does not use is an error too (it would otherwise be silently ignored). A params
file named by --params or $CAI_PARAMS must exist; only the implicit ./params.yaml may be absent.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from cai_lib.backends import BACKENDS
from cai_lib.backends.weights import DTYPE_NAMES

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"
PARAMS_ENV = "CAI_PARAMS"


def default_params() -> str:
    """The params file a command reads when --params is not given: $CAI_PARAMS, else params.yaml in the
    working directory (where dvc repro runs)."""
    return os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS


class ConfigError(ValueError):
    pass


BOUNDS = ("lo", "gt", "hi", "lt")   # inclusive minimum, exclusive minimum, inclusive maximum, exclusive maximum


def opt(default: Any, help: str, **kw) -> Any:
    """A config field with a default and its help text; `kw` may bound it (lo, gt, hi, lt), list its
    `choices` (for a list: of each item), or refuse an empty string (`nonempty=True`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


# ---------------------------------------------------------------- the groups jobs are made of

@dataclasses.dataclass
class LakeConfig:
    """Every command: where the lake is and which params file fills the rest."""
    lake: str = opt("lake", "lake root folder (one Delta table per subfolder) or a cloud URI (--lake-engine spark); "
                            "never empty (that would be the current folder)", nonempty=True)
    params: str = dataclasses.field(default_factory=default_params, metadata={
        "help": f"params file to read; it must exist (/dev/null = the defaults only). Default ${PARAMS_ENV}, "
                f"else ./{DEFAULT_PARAMS}, which alone may be absent (then the defaults)", "nonempty": True})


@dataclasses.dataclass
class SeedConfig:
    seed: int = opt(1234, "base seed; every request's seed derives from it and the request's key", lo=0)


@dataclasses.dataclass
class SparkModelConfig:
    """Jobs that run a model through a backend inside Spark's Python workers."""
    backend: str = opt("transformers", "transformers (CPU/GPU) | vllm (CPU: in .venv; GPU: .venv-gpu) | fake (tests)",
                       choices=BACKENDS)
    dtype: str = opt("auto", "compute dtype: auto (bf16 on a GPU or a bf16-capable CPU, else float32) | bfloat16 | "
                             "float32 | float16", choices=("auto", *DTYPE_NAMES))
    spark_master: str = opt("local[1]", "Spark master; each Python worker loads one model copy", nonempty=True)
    torch_threads: int = opt(2, "torch threads per Spark worker: workers x threads <= cores", lo=1, hi=1024)


@dataclasses.dataclass
class RegistryConfig:
    """Jobs that read or write registered models (MLflow)."""
    tracking_uri: str = opt("sqlite:///mlflow/mlflow.db", "MLflow tracking + registry store (env MLFLOW_TRACKING_URI wins)")
    artifact_dir: str = opt("mlflow/artifacts", "where a new MLflow experiment keeps its artifacts (weights)")
    experiment: str = opt("cai", "MLflow experiment of the training runs")


@dataclasses.dataclass
class PointerConfig:
    pointer: str | None = opt(None, "write a pointer file (table -> Delta version, row counts) here, for DVC")


@dataclasses.dataclass
class _ModelNames:
    base_model: str = "default"
    feedback_model: str = "default"


GROUPS = (LakeConfig, SeedConfig, SparkModelConfig, RegistryConfig, PointerConfig)
# Keys a release no longer reads, with why: a params file that still sets one is told what changed.
RETIRED = {"lake_engine": "delta-spark is now the lake's only writer (every job runs on the Spark plane; delta-rs "
                          "and DuckDB only read): remove the key"}
# [common] may set any group's key and the model names several jobs share; a job takes those it has.
_COMMON_OWNER = {f.name: g for g in (*GROUPS, _ModelNames) for f in dataclasses.fields(g)}
COMMON_KEYS = frozenset(_COMMON_OWNER)


def settings_from(cfg, cls: type[T], **explicit) -> T:
    """Library settings `cls` from a job config: each field of `cls` the config has, plus `explicit`.

    The one way a job turns its config into library settings: job configs inherit the settings
    dataclass (one source of defaults and help), and this copies the values across.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    return cls(**{**values, **explicit})


# ---------------------------------------------------------------- types

def _base_type(tp: Any) -> Any:
    """int from `int | None`, list from `list[str]`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _optional(tp: Any) -> bool:
    return (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) and type(None) in typing.get_args(tp)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flag_of(name: str) -> str:
    """The command-line flag of config field `name`: `--max-ece` for max_ece."""
    return "--" + name.replace("_", "-")


def _label(where: str, key: str) -> str:
    """How an error names a value: `params.yaml [gate] max_ece` or, for a flag, `flag --max-ece`."""
    return f"flag {flag_of(key)}" if where == "flag" else f"{where} {key}"


def check_value(cls, key: str, value: Any, where: str) -> Any:
    """`value` for field `key` of `cls`, checked (and int -> float widened) like a flag would be, then
    against the field's bounds and choices (check_bounds). `where` is the file and section, or "flag".

    >>> check_value(SeedConfig, "seed", 7, "p.yaml [common]")
    7
    >>> check_value(SeedConfig, "seed", "7", "p.yaml [common]")
    Traceback (most recent call last):
    cai_lib.config.ConfigError: p.yaml [common] seed: '7' is a str, expected int. Fix: write the number without quotes
    """
    tp = typing.get_type_hints(cls)[key]
    base = _base_type(tp)
    label = _label(where, key)
    if value is None:
        if _optional(tp):
            return None
        raise ConfigError(f"{label}: null is not allowed, expected {base.__name__}. Fix: give a value or "
                          f"delete the key to use the default")
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list),
          tuple: lambda v: isinstance(v, (list, tuple)),
          dict: lambda v: isinstance(v, dict)}.get(base, lambda v: True)
    if not ok(value):
        fix = "write the number without quotes" if base in (int, float) else f"give {key} a {base.__name__}"
        raise ConfigError(f"{label}: {value!r} is a {type(value).__name__}, expected {base.__name__}. "
                          f"Fix: {fix}")
    value = float(value) if base is float else value
    check_bounds(_fields(cls)[key], value, label)
    return value


def _range(meta: dict) -> str:
    """The allowed range in words: 'from 1 to 16', '> 0 and <= 1', '>= 0'."""
    low = f">= {meta['lo']}" if "lo" in meta else f"> {meta['gt']}" if "gt" in meta else None
    high = f"<= {meta['hi']}" if "hi" in meta else f"< {meta['lt']}" if "lt" in meta else None
    if "lo" in meta and "hi" in meta:
        return f"from {meta['lo']} to {meta['hi']}"
    return " and ".join(x for x in (low, high) if x) or "any finite number"


def check_bounds(f: dataclasses.Field, value: Any, label: str) -> None:
    """Refuse a non-finite float, a number outside the field's bounds, a value (or list item) not one
    of its choices, an empty string where the field is `nonempty`. `label` names the value's source.

    >>> check_bounds(dataclasses.fields(SeedConfig)[0], -1, "p.yaml [common] seed")
    Traceback (most recent call last):
    cai_lib.config.ConfigError: p.yaml [common] seed: -1 is below the minimum 0 (seed: base seed; every request's seed derives from it and the request's key). Fix: give a value >= 0
    """
    meta, what = f.metadata, f"({f.name}: {f.metadata.get('help', '')})"
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{label}: {value} is not a finite number {what}. Fix: give a number {_range(meta)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        too_low = ("lo" in meta and value < meta["lo"]) or ("gt" in meta and value <= meta["gt"])
        too_high = ("hi" in meta and value > meta["hi"]) or ("lt" in meta and value >= meta["lt"])
        if too_low or too_high:
            side = (f"below the minimum {meta['lo']}" if "lo" in meta and value < meta["lo"] else
                    f"not above {meta['gt']}" if too_low else
                    f"above the maximum {meta['hi']}" if "hi" in meta and value > meta["hi"] else
                    f"not below {meta['lt']}")
            raise ConfigError(f"{label}: {value} is {side} {what}. Fix: give a value {_range(meta)}")
    choices = meta.get("choices")
    for item in (value if isinstance(value, (list, tuple)) else [value]) if choices else ():
        if item not in choices:
            raise ConfigError(f"{label}: {item!r} is not one of {', '.join(map(repr, choices))} {what}. "
                              f"Fix: write one of them")
    if meta.get("nonempty") and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{label}: {value!r} is empty {what}. Fix: give {f.name} a value")


def check_fields(obj) -> None:
    """Every field of a config built directly (tests, benches, library callers) against its bounds and
    choices, as load_config checks params and flags: a config object never holds an unchecked value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, label, base = getattr(obj, f.name), f"{type(obj).__name__} {f.name}", _base_type(hints[f.name])
        wrong = base is int and (isinstance(value, bool) or not isinstance(value, int)) or \
            base is float and (isinstance(value, bool) or not isinstance(value, (int, float)))
        if wrong and value is not None:
            raise ConfigError(f"{label}: {value!r} is a {type(value).__name__}, expected {base.__name__}")
        check_bounds(f, value, label)


def implicit_params(path: str | Path) -> bool:
    """True for the params file nobody named: ./params.yaml with no --params and no $CAI_PARAMS. Only
    it may be absent (a quick try outside the project runs on the defaults, docs/data_plane.md)."""
    return str(path) == DEFAULT_PARAMS and not os.environ.get(PARAMS_ENV)


def read_params(path: str | Path, named: bool | None = None) -> dict[str, Any]:
    """The params file's sections. A file named by --params or $CAI_PARAMS (`named`; by default any
    but the implicit ./params.yaml) must exist: a typo would otherwise run silently on the defaults."""
    path = Path(path)
    if not path.exists():
        if named or (named is None and not implicit_params(path)):
            raise ConfigError(f"params file {path} does not exist. Fix: check --params (or ${PARAMS_ENV}), "
                              f"or pass --params /dev/null to run on the defaults alone")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (common, ingest, ...)")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{path} [{name}]: a section must be a mapping of key: value, got {section!r}")
    return data


# ---------------------------------------------------------------- flags

class _Parser(argparse.ArgumentParser):
    def parse_strict(self, argv):
        args, extra = self.parse_known_args(argv)
        if extra:
            flags = [x for x in extra if x.startswith("-")] or extra
            for flag in flags:
                retired = RETIRED.get(flag.lstrip("-").split("=")[0].replace("-", "_"))
                if retired:
                    self.error(f"{flag}: {retired.replace('remove the key', 'drop the flag')}")
            self.error(f"{' '.join(flags)}: not used by `{self.prog}` (it would be ignored). "
                       f"Its flags are listed by `{self.prog} --help`")
        return args


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        flag = flag_of(name)
        base = _base_type(hints[name])
        help_ = f.metadata.get("help", "").replace("%", "%%")   # argparse %-formats help: "95%" would crash --help
        if f.metadata.get("flag") is False:
            continue  # params file only (e.g. a list of {path, kind} mappings)
        if base is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif base in (list, tuple):
            p.add_argument(flag, dest=name, nargs="+", default=None, help=help_)
        elif base is dict:
            continue  # params file only
        else:
            p.add_argument(flag, dest=name, type=base, default=None, help=help_, metavar=name.upper())
    return p


def load_config(cls: type[T], section: str, argv: Sequence[str] | None, description: str = "") -> T:
    """Defaults <- params.yaml[common] (keys the job has) <- params.yaml[section] <- flags, every value
    checked (type, finiteness, bounds, choices) before the config is built: before any job starts Spark."""
    parser = build_parser(cls, f"cai {section.replace('_', '-')}", description)
    flags = {k: check_value(cls, k, v, "flag")
             for k, v in vars(parser.parse_strict(argv)).items() if v is not None}
    params_path = flags.get("params") or default_params()
    params = read_params(params_path, named=True if "params" in flags else None)
    fields = _fields(cls)
    common = params.get("common") or {}
    for key in set(common) & set(RETIRED):
        raise ConfigError(f"{params_path} [common] {key}: {RETIRED[key]}")
    unknown = set(common) - COMMON_KEYS
    if unknown:
        raise ConfigError(f"{params_path} [common]: unknown key(s) {sorted(unknown)}; valid keys: {sorted(COMMON_KEYS)}")
    values: dict[str, Any] = {}
    for k, v in common.items():   # checked even where this job does not take the key: one file, one verdict
        v = check_value(_COMMON_OWNER.get(k, _ModelNames), k, v, f"{params_path} [common]")
        if k in fields:
            values[k] = v
    for key, value in (params.get(section) or {}).items():
        if key in RETIRED:
            raise ConfigError(f"{params_path} [{section}] {key}: {RETIRED[key]}")
        if key not in fields:
            raise ConfigError(f"{params_path} [{section}]: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        values[key] = check_value(cls, key, value, f"{params_path} [{section}]")
    values.update(flags)
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section} config (read from {params_path} [common] + [{section}], then the flags): "
                          f"{exc}") from None
    check_flags_used(cfg, flags)
    return cfg


def check_flags_used(cfg, flags: dict[str, Any]) -> None:
    """A flag these settings would ignore is an error: a config class lists in FLAG_NEEDS the fields that
    only count under another field's values (`label`'s --clamp-lo only with --cot). A params file may still
    set them (it serves every run); a flag is this run's request, and ignoring it would be a lie.

    >>> @dataclasses.dataclass
    ... class C:
    ...     FLAG_NEEDS: typing.ClassVar = {"clamp_lo": ("cot", (True,))}
    ...     cot: bool = False
    ...     clamp_lo: float = 0.4
    >>> check_flags_used(C(cot=True), {"clamp_lo": 0.3})
    >>> check_flags_used(C(), {"clamp_lo": 0.3})
    Traceback (most recent call last):
    cai_lib.config.ConfigError: flag --clamp-lo counts only when cot is True, and here cot is False: it would be ignored. Fix: drop --clamp-lo, or pass --cot
    """
    for key in flags:
        needs = getattr(type(cfg), "FLAG_NEEDS", {}).get(key)
        if needs is None:
            continue
        other, allowed = needs
        value = getattr(cfg, other)
        if value in allowed:
            continue
        flag = flag_of(key)
        how = f"pass {flag_of(other)}" + ("" if allowed == (True,) else f" {' or '.join(map(str, allowed))}")
        raise ConfigError(f"flag {flag} counts only when {other} is {' or '.join(map(str, allowed))}, and here "
                          f"{other} is {value}: it would be ignored. Fix: drop {flag}, or {how}")
