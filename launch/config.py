"""YAML recipes + ``key=value`` overrides, validated against dataclass schemas.

Every entry point describes its configuration as a tree of dataclasses and calls :func:`load_config`.
Validation happens before any work starts: an unknown key (with a "did you mean" suggestion), a value of the
wrong type, or a path that must exist and does not, raises :class:`ConfigError` naming the dotted key.

Path semantics are declared on the field with ``metadata``:

* ``must_exist=True``: the value is a file or folder that must exist (``None``/empty allowed when optional).
* ``shards=True``: the value is a shard pattern (path, glob, brace range ``{00000..00009}``, or several
  joined by ``::``) that must expand to at least one existing file.

Checks beyond types have one hook: a config dataclass (a section, a model's or a task's options, the recipe
itself) may define ``validate(self, recipe) -> None``, which raises :class:`ConfigError`. :func:`load_config`
calls it on every dataclass of the tree, parent before children, with the whole recipe as ``recipe`` (so a check
may read other sections: a model that refuses MixGen, a task that needs an eval metric). A parent's ``validate``
may replace a ``dict`` field by its dataclass (the registry-selected ``model`` and ``task``); the walk then
validates the replacement. Entry points wrap ``main`` in :func:`exits_on_config_error`: one line
``config error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
CONFIG_ERROR_STATUS = 2  # the exit status of every entry point for a configuration error


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key or the path it concerns."""


def exits_on_config_error(main: typing.Callable[..., int]) -> typing.Callable[..., int]:
    """Decorate an entry point's ``main``: a :class:`ConfigError` becomes one stderr line and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except ConfigError as exc:
            from launch.logging import report_config_error  # rank 0 prints: every rank finds the same error

            report_config_error(exc)
            return CONFIG_ERROR_STATUS

    return wrapper


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` merged in: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def expand_shards(pattern: str) -> list[str]:
    """Expand a shard pattern (``::``-joined; brace ranges; globs) into a sorted list of existing paths."""
    import braceexpand

    out: list[str] = []
    for part in str(pattern).split("::"):
        part = part.strip()
        if not part:
            continue
        for item in braceexpand.braceexpand(part):
            if any(ch in item for ch in "*?["):
                out.extend(sorted(glob.glob(item)))
            elif os.path.exists(item):
                out.append(item)
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it (nested dataclasses are built)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            # YAML turns `variant: a` into a string but `variant: 1` into int; accept str(value) matches.
            if str(value) in [str(c) for c in choices]:
                return next(c for c in choices if str(c) == str(value))
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    return value


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'{_suggest(name, fields)}")
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key '{(prefix + '.') if prefix else ''}{missing[0]}'")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    # YAML 1.1 reads "16:1" as the base-60 integer 961; colon-separated digits stay a string (ratios, times).
    if re.fullmatch(r"\d+(:\d+)+", text.strip()):
        return text.strip()
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating the intermediate mappings."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``true``, ``3``, ``[1, 2]``)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        out.append((key, _parse_scalar(raw)))
    return out


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIRS = ("assets", "configs")  # folders of the repository that recipes name by a relative path


def resolve_project_path(value: str | os.PathLike) -> str:
    """``value``, or the shipped file it names when run from another working directory.

    A relative ``assets/...`` or ``configs/...`` path that does not exist here but exists in the project's own
    folders resolves there, so recipes (and ``--config configs/...``) work from any working directory. Anything
    else, outputs and user data included, stays relative to the working directory.
    """
    text = os.fspath(value)
    p = Path(text)
    if p.is_absolute() or p.exists() or not p.parts or p.parts[0] not in SHIPPED_DIRS:
        return text
    shipped = PROJECT_ROOT / p
    return str(shipped) if shipped.exists() else text


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error on a missing or malformed file."""
    p = Path(resolve_project_path(path))
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def _check_paths(obj: Any, prefix: str = "") -> None:
    """Check what a recipe names outside itself: paths, shard patterns, and fields with a ``check`` callable."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_paths(value, key)
            continue
        if value in (None, "", "none"):
            continue
        if f.metadata.get("must_exist") and isinstance(value, str):
            value = resolve_project_path(value)
            setattr(obj, f.name, value)
        values = value if isinstance(value, (list, tuple)) else [value]
        if f.metadata.get("must_exist"):
            for v in values:
                if not os.path.exists(str(v)):
                    raise ConfigError(f"{key}: path does not exist: {v}")
        if f.metadata.get("shards"):
            for v in values:
                if not expand_shards(str(v)):
                    raise ConfigError(f"{key}: no shard files match {v!r}")
        check = f.metadata.get("check")
        if check is not None:  # a name that resolves to something outside the recipe (a model on disk or hub)
            for v in values:
                check(v, key)


def load_config(
    schema: type[T],
    path: str | os.PathLike | None = None,
    overrides: typing.Sequence[str] = (),
    check_paths: bool = True,
) -> T:
    """Load ``path`` (optional), apply ``key=value`` overrides, validate against ``schema``."""
    tree: dict[str, Any] = read_yaml(path) if path else {}
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    prepare = getattr(schema, "prepare_tree", None)
    if callable(prepare):  # a schema may fill keys the recipe leaves out from elsewhere (a run it starts from)
        tree = prepare(tree)
    cfg = build_dataclass(schema, tree)
    validate_tree(cfg)
    if check_paths:
        _check_paths(cfg)
    return cfg


def validate_tree(tree: Any, recipe: Any = None) -> None:
    """Call ``validate(recipe)`` on every dataclass of ``tree``, parent before children.

    ``recipe`` defaults to ``tree`` itself: options validated on their own (outside a recipe) see no other section,
    so a hook that reads one uses ``getattr(recipe, "<section>", None)``.
    """
    recipe = tree if recipe is None else recipe

    def visit(node: Any) -> None:
        hook = getattr(node, "validate", None)
        if callable(hook):
            hook(recipe)
        for f in dataclasses.fields(node):
            child = getattr(node, f.name)  # read after the parent's hook: it may have resolved a dict field
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                visit(child)

    visit(tree)


def resolve_named_options(
    section: str, mapping: Any, lookup: typing.Callable[[str], tuple[type, Any]], names: typing.Sequence[str]
) -> Any:
    """Build the options dataclass that ``mapping["name"]`` selects through ``lookup`` (a registry); a missing or
    unknown name, an unknown key or a wrong type is a ConfigError under ``section``. Its ``validate(recipe)`` runs in
    :func:`validate_tree` like every other section's.
    """
    if dataclasses.is_dataclass(mapping):
        return mapping
    mapping = dict(mapping)
    name = mapping.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name: required (one of {', '.join(names)})")
    try:
        options_cls, _ = lookup(name)
    except KeyError as exc:
        raise ConfigError(f"{section}.name: {exc.args[0]}") from None
    return build_dataclass(options_cls, mapping, prefix=section)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for saving and logging)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)


def exists_field(default: Any = None, **kw: Any) -> Any:
    """A dataclass field whose value is a path that must exist."""
    return dataclasses.field(default=default, metadata={"must_exist": True, **kw})


def shards_field(default: Any = None) -> Any:
    """A dataclass field whose value is a shard pattern that must match files."""
    return dataclasses.field(default=default, metadata={"shards": True})


@dataclasses.dataclass
class RunConfig:
    """Output folder and seed; the same keys in every recipe."""

    dir: str = "runs/default"
    seed: int = 0
