"""Turning YAML into typed config dataclasses.

Rules (docs/configs.md):
- YAML keys, dataclass fields and function parameters share one name.
- An unknown key is an error that lists the valid keys; every problem in a file
  is reported together, each with its dotted path.
- Each dataclass validates itself in ``__post_init__`` (raise ``ValueError``
  stating the rule and the fix).
- ``--set a.b=c`` overrides are parsed as YAML scalars (``3``, ``1e-4``,
  ``true``, ``[q_proj, v_proj]``) and applied before the dataclasses are built.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Type, TypeVar, Union

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` holds each line."""

    def __init__(self, problems: List[str], source: str = "") -> None:
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem(s){where}:"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str, problems: List[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where lossless."""
    if tp is Any:
        return value
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        problems.append(f"{path}: null is not allowed (expected {_type_name(tp)})")
        return None
    tp = inner
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
            return None
        return _build(tp, value, path, problems)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, List, Sequence, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return value
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, val_tp, f"{path}.{k}", problems) for k, v in value.items()}
    if origin in (Union, types.UnionType):
        reasons: List[str] = []
        for arg in typing.get_args(tp):
            sub: List[str] = []
            out = _coerce(value, arg, path, sub)
            if not sub:
                return out
            reasons.extend(r.split(": ", 1)[-1] for r in sub)
        problems.append(f"{path}: {value!r} matches none of its forms ({'; '.join(reasons)})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: Type[C], data: Mapping[str, Any], path: str, problems: List[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    prefix = f"{path}." if path else ""
    for key in unknown:
        problems.append(
            f"{prefix}{key}: unknown key for {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs: Dict[str, Any] = {}
    n_before = len(problems)
    for name, value in data.items():
        if name in fields:
            kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", problems)
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in data:
            problems.append(f"{prefix}{name}: required key is missing")
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        problems.append(f"{path or cls.__name__}: {exc}")
        return None


def from_dict(cls: Type[C], data: Mapping[str, Any] | None, source: str = "") -> C:
    """Build ``cls`` from a nested mapping; raise ``ConfigError`` listing every problem."""
    problems: List[str] = []
    out = _build(cls, data or {}, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return out


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain nested dict (lists, not tuples) that ``from_dict`` accepts back."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def parse_override(text: str) -> tuple[List[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], value parsed as a YAML scalar or flow list)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-5"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {text!r}: empty key; expected a dotted path like optim.lr"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # yaml reads 1e-5 as a string (YAML 1.1); numbers are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``--set`` overrides to a nested dict (in place, and returned)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError([f"--set {text}: {k!r} is not a section"])
            node = nxt
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections"], str(path))
    return data


def _leaf_paths(data: Mapping[str, Any], prefix: str = "") -> List[str]:
    paths: List[str] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            paths.extend(_leaf_paths(value, path + "."))
        else:
            paths.append(path)
    return paths


def _is_set(data: Mapping[str, Any], dotted: str) -> bool:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def load_config(cls: Type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """YAML file (optional) + ``--set`` overrides (+ environment variables for the
    keys in ``cls.ENV_KEYS`` that neither sets) -> a validated ``cls``.

    Where each value came from goes to ``cfg.sources`` when ``cls`` has that
    field: ``{"run.device": "$NPU_RFT_DEVICE", "optim.lr": "--set", ...}``;
    keys left out are defaults."""
    data = load_yaml(path) if path is not None else {}
    sources = {key: f"file {path}" for key in _leaf_paths(data)}
    apply_overrides(data, overrides)
    for text in overrides:
        sources[".".join(parse_override(text)[0])] = "--set"
    for key, env in getattr(cls, "ENV_KEYS", {}).items():
        raw = os.environ.get(env)
        if raw is not None and raw.strip() and not _is_set(data, key):
            try:
                apply_overrides(data, [f"{key}={raw.strip()}"])
            except ConfigError as exc:
                raise ConfigError([f"${env}: {p}" for p in exc.problems]) from None
            sources[key] = f"${env}"
    try:
        cfg = from_dict(cls, data, str(path) if path else "")
    except ConfigError as exc:
        env_sourced = {k: v for k, v in sources.items() if v.startswith("$")}
        if not env_sourced:
            raise
        note = f"(from the environment: {', '.join(f'{k} <- {v}' for k, v in env_sourced.items())})"
        raise ConfigError(exc.problems + [note], str(path) if path else "") from None
    if any(f.name == "sources" for f in dataclasses.fields(cls)):
        cfg.sources = sources
    return cfg
