"""Validated, frozen config dataclasses built from plain data (TOML, CLI overrides).

Every concern (model, task, optimiser, training, sweep) owns a small frozen dataclass.
This module holds the one mechanism that builds them from dictionaries: unknown keys,
wrong types and bad values are all collected, each named by its dotted path
(`model.n_heads`), and raised together as one `ConfigError` before anything compiles.

A dataclass states its own value rules in a `problems()` method returning
`[(field, message), ...]`; `__post_init__` should call `check(self)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more invalid config values, each with its dotted path."""

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = [(str(p), str(m)) for p, m in problems]
        lines = [f"{p}: {m}" if p else m for p, m in self.problems]
        super().__init__("invalid config:\n  " + "\n  ".join(lines))

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems with `prefix.` in front of every path."""
        if not prefix:
            return self
        return ConfigError([(f"{prefix}.{p}" if p else prefix, m) for p, m in self.problems])


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted(path: str, key: str) -> str:
    """`path.key`, the key quoted as TOML quotes it unless it is bare (`model."a b"`)."""
    key = str(key)
    if not _BARE_KEY.fullmatch(key):
        key = json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 64}} -> {'model.d_model': 64}."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def check(obj: Any) -> None:
    """Raise ConfigError if `obj.problems()` reports anything."""
    found = list(obj.problems())
    if found:
        raise ConfigError(found)


def one_of(value: Any, allowed: Iterable[Any]) -> str | None:
    """A message if `value` is not in `allowed`, else None."""
    allowed = list(allowed)
    if value in allowed:
        return None
    return f"{value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"


def in_range(value: float, low: float | None = None, high: float | None = None) -> str | None:
    """A message if `value` lies outside [low, high], else None."""
    if low is not None and value < low:
        return f"must be >= {low}, got {value}"
    if high is not None and value > high:
        return f"must be <= {high}, got {value}"
    return None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Convert plain data `value` to annotation `tp`, raising ConfigError with `path`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError([(path, f"expected a table of {tp.__name__} fields, got {value!r}")])
        return from_dict(tp, value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError([(path, one_of(value, allowed))])
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.extend(m for _, m in e.problems)
        raise ConfigError([(path, f"expected {_type_name(tp)}, got {value!r}")])
    if origin in (tuple, list, Sequence):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError([(path, f"expected a list, got {value!r}")])
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError([(path, f"expected {len(args)} items, got {len(value)}")])
            item_types = args
        else:
            item_types = [args[0] if args else Any] * len(value)
        problems, items = [], []
        for i, (item_tp, item) in enumerate(zip(item_types, value, strict=True)):
            try:
                items.append(_convert(item_tp, item, f"{path}[{i}]"))
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError([(path, f"expected a table, got {value!r}")])
        _, value_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(value_tp, v, dotted(path, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != value:  # NaN passes every comparison a value rule makes
                raise ConfigError([(path, "expected a number, got nan")])
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    raise ConfigError([(path, f"expected {_type_name(tp)}, got {value!r}")])


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`; every problem found is raised in one ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems: list[tuple[str, str]] = []
    dot = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            where = dotted(path, key)
            moved = MOVED.get(where)
            message = f"unknown field; {cls.__name__} has: {', '.join(sorted(fields))}"
            problems.append((where, f"moved to {moved}" if moved else message))
    kwargs = {}
    for name in fields:
        if name in data:
            try:
                kwargs[name] = _convert(hints[name], data[name], f"{dot}{name}")
            except ConfigError as e:
                problems.extend(e.problems)
    if problems:
        problems.extend(_value_problems(cls, fields, kwargs, dot))
        raise ConfigError(problems)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError([(f"{dot}{n}", "required field is missing") for n in missing])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.prefixed(path) from None


def _value_problems(cls, fields, kwargs, dot: str) -> list[tuple[str, str]]:
    """`cls.problems()` for the fields that did convert, the others at their defaults.

    So a bad value is reported together with an unknown key or a type error elsewhere in the
    same table, not only once those are fixed.
    """
    if not hasattr(cls, "problems"):
        return []
    obj = object.__new__(cls)
    for name, f in fields.items():
        if name in kwargs:
            value = kwargs[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return []  # a required field is missing: its rules cannot be checked yet
        object.__setattr__(obj, name, value)
    try:
        found = obj.problems()
    except Exception:  # noqa: BLE001 - a rule may assume a field this table got wrong
        return []
    return [(f"{dot}{p}", m) for p, m in found if re.split(r"[.\[]", p)[0] in kwargs]


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass, for TOML/JSON/hparams."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (never executed; duplicate keys are an error in TOML itself)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"experiment file not found: {path}")])
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        # tomllib names only the position (e.g. of a duplicate key): show that line too.
        where = re.search(r"at line (\d+)", str(e))
        lines = path.read_text(errors="replace").splitlines()
        if where and 0 < int(where.group(1)) <= len(lines):
            e = f"{e}: {lines[int(where.group(1)) - 1].strip()!r}"
        raise ConfigError([("", f"{path} is not valid TOML: {e}")]) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a","b","c"], value); the value is read as TOML if it can be."""
    if "=" not in text:
        raise ConfigError([("", f"override {text!r} must look like key.path=value")])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([("", f"override {text!r} has an empty key")])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of `data` with each dotted `key=value` override applied."""
    out = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(out, parts, value, ".".join(parts))
    return out


def set_dotted(data: dict[str, Any], parts: Sequence[str], value: Any, path: str) -> None:
    """data[parts[0]]...[parts[-1]] = value, making missing tables; `path` names it in errors."""
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError([(path, f"{p!r} is a value, not a table")])
        node = child
    node[parts[-1]] = value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# Fields that moved, by their old dotted path: what an experiment file now writes instead.
MOVED = {
    "model.random_scale": "model.attention_settings.random_fixed.scale "
    "(and model.attention_settings.synthesizer.scale)",
    "model.gaussian_sigma": "model.attention_settings.gaussian.sigma",
    "model.gaussian_offsets": "model.attention_settings.gaussian.offsets",
    "model.n_classes": "nothing: the model has no classification head (text_classification "
    "predicts its label at a final CLS token; set task.n_classes)",
}

# Model fields of run folders written before variants owned their settings: (old field, the
# variants it applied to, the field in their settings).
_LEGACY_MODEL_FIELDS = (
    ("random_scale", ("random_fixed", "synthesizer"), "scale"),
    ("gaussian_sigma", ("gaussian",), "sigma"),
    ("gaussian_offsets", ("gaussian",), "offsets"),
)

# Train fields that run folders written before them lack: the value that reproduces what such
# a run did (eval_points, unused by "every", at its default so resuming sees no change).
_ADDED_TRAIN_FIELDS = {"eval_schedule": "every", "eval_points": 24}


def _names_in(spec: Any) -> set[str]:
    """Every variant name in a `model.attention` value (a name, or nested lists of names)."""
    if isinstance(spec, str):
        return {spec}
    if isinstance(spec, list | tuple):
        return set().union(*(_names_in(x) for x in spec))
    return set()


def upgrade_saved(data: Mapping[str, Any]) -> dict[str, Any]:
    """A run folder's saved experiment (config.json) in today's fields.

    Earlier versions wrote `model.n_classes` (always 0: a classification head was refused)
    and the variant settings `model.random_scale`, `gaussian_sigma`, `gaussian_offsets`; they
    now live in `model.attention_settings.NAME`: each value moves to the variants it applied to
    that the model uses (as today's config.json records their settings), so an old run folder
    resumes and probes as it was. Train fields added since get the value that reproduces what
    such a run did. Anything else is returned as it was, for validation to judge.
    """
    data = _deep_copy(dict(data))
    train = data.get("train")
    if isinstance(train, dict):
        for field, value in _ADDED_TRAIN_FIELDS.items():
            train.setdefault(field, value)
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    if model.get("n_classes") == 0:
        del model["n_classes"]
    used = _names_in(model.get("attention"))
    settings = model.get("attention_settings", {})
    for old, variants, field in _LEGACY_MODEL_FIELDS:
        if old not in model or not isinstance(settings, dict):
            continue
        value = model.pop(old)
        for name in sorted(used & set(variants)):
            settings.setdefault(name, {}).setdefault(field, value)
        model["attention_settings"] = settings
    return data
