"""Typed job configs filled from `params.yaml` (the file dvc.yaml reads) and command-line flags.

A job config is a dataclass whose fields carry `metadata={"help": ...}`. `load_config` merges,
in order: field defaults, the `common` section, the job's section, then flags. Unknown keys
are an error naming the file, the section and the valid keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    pass


def opt(default: Any, help: str, **kw) -> Any:
    """A config field with a default and its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class CommonConfig:
    lake: str = opt("lake", "lake root folder (one Delta table per subfolder)")
    model: str = opt("default", "model id: 'default' (embedded SmolLM2-135M-Instruct), a model folder, or a cached hub id")
    backend: str = opt("transformers", "transformers (CPU/GPU) | vllm (GPU, own environment) | fake (tests)")
    dtype: str = opt("bfloat16", "model weights dtype: bfloat16 | float32 | float16")
    spark_master: str = opt("local[1]", "Spark master; each Python worker loads one model copy")
    torch_threads: int = opt(2, "torch threads per Spark worker: workers x threads <= cores")
    seed: int = opt(1234, "base seed; every request's seed derives from it and the request's key")
    params: str = opt(DEFAULT_PARAMS, "params file to read (missing file = defaults)")
    pointer: str | None = opt(None, "write a pointer file (table -> Delta version, row counts) here, for DVC")
    tracking_uri: str = opt("sqlite:///mlflow/mlflow.db", "MLflow tracking + registry store (env MLFLOW_TRACKING_URI wins)")
    artifact_dir: str = opt("mlflow/artifacts", "where a new MLflow experiment keeps its artifacts (weights)")
    experiment: str = opt("cai", "MLflow experiment of the training runs")


def _base_type(tp: Any) -> Any:
    """int from `int | None`, list from `list[str]`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def read_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (common, ingest, ...)")
    return data


def _apply(cfg_values: dict, section: dict, cls, where: str) -> None:
    fields = _fields(cls)
    for key, value in section.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        cfg_values[key] = value


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        flag = "--" + name.replace("_", "-")
        base = _base_type(hints[name])
        help_ = f.metadata.get("help", "")
        if base is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif base is list:
            p.add_argument(flag, dest=name, nargs="+", default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, type=base, default=None, help=help_,
                           metavar=name.upper())
    return p


def load_config(cls: type[T], section: str, argv: Sequence[str] | None, description: str = "") -> T:
    """Defaults <- params.yaml[common] <- params.yaml[section] <- flags."""
    parser = build_parser(cls, f"cai {section.replace('_', '-')}", description)
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    params_path = flags.get("params", DEFAULT_PARAMS)
    params = read_params(params_path)
    values: dict[str, Any] = {}
    common = params.get("common") or {}
    common_fields = set(_fields(CommonConfig))
    unknown = set(common) - common_fields
    if unknown:
        raise ConfigError(f"{params_path} [common]: unknown key(s) {sorted(unknown)}; valid keys: {sorted(common_fields)}")
    values.update({k: v for k, v in common.items() if k in _fields(cls)})
    _apply(values, params.get(section) or {}, cls, f"{params_path} [{section}]")
    values.update(flags)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section} config: {exc}") from None
