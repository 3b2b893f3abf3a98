"""Dataclass configs <-> command line flags <-> YAML files.

Every pipeline stage is configured by a dataclass whose fields carry a docstring (an attribute docstring,
the string literal right below the field). This module turns such a dataclass into flags on the command's
parser (the docstring becomes the help text). The parser itself is a ``jsonargparse.ArgumentParser`` (see
:mod:`clp_transfer.cli`), which reads ``--config`` YAML files that mirror the dataclass, checks their keys
and types against these flags, and merges defaults < YAML < flags given on the command line.

Flags accept both spellings, ``--learning_rate`` (Hugging Face style) and ``--learning-rate``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import ClpError

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> attribute docstring, read from the class source (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _float(text: str) -> float:
    """A float flag's value; non-finite values are parsed here and refused by :func:`from_dict` with the
    flag's name (the parser's own float check would reject them with a generic message)."""
    return float(text)


_float.__name__ = "float"  # argparse names the type in its errors: "invalid float value"


def _converter(tp: Any):
    if tp is float:
        return _float
    if tp in (int, str):
        return tp
    if tp is Path:
        return Path
    return str


TEXT_FLAG = "--text"
"""The one flag name for target-language text in every stage; a config class whose text field has another
name marks it with :func:`text_flag`, and that field's own flag stays as an alias."""


def text_flag(field_name: str) -> Callable[[type[C]], type[C]]:
    """Class decorator: ``--text`` sets the field ``field_name`` of this config (whose own flag, the older
    spelling, keeps working)."""

    def mark(cls: type[C]) -> type[C]:
        cls.TEXT_FLAG = field_name  # type: ignore[attr-defined]
        return cls

    return mark


def flag_names(cls: type, name: str) -> list[str]:
    """The flags of field ``name``: ``--text`` first for the class's text field, then ``--name`` and, when
    the name has an underscore, ``--name-with-dashes``."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    if getattr(cls, "TEXT_FLAG", None) == name:
        names.insert(0, TEXT_FLAG)
    return names


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls``. Defaults are suppressed so that only given flags appear."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        names = flag_names(cls, f.name)
        help_text = docs.get(f.name, "")
        if default is not None and default != [] and tp is not bool:
            help_text += f" (default: {default})"
        # argparse %-formats help strings: a literal % (e.g. "30%") must be doubled or --help crashes.
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%")}
        origin = get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif origin in (list, tuple):
            (item,) = get_args(tp)[:1] or (str,)
            kwargs["nargs"] = "+"
            kwargs["type"] = _converter(item)
        else:
            kwargs["type"] = _converter(tp)
        parser.add_argument(*names, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ClpError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ClpError(f"config file {str(path)!r} must hold a mapping of field names to values")
    return data


def from_dict(cls: type[C], values: dict[str, Any], where: str = "config") -> C:
    """Build ``cls`` from a mapping, rejecting unknown keys with a "did you mean" hint."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ClpError(f"unknown field {key!r} in {where}{hint}")
    hints = typing.get_type_hints(cls)
    coerced = {}
    for key, value in values.items():
        tp, _ = _unwrap_optional(hints[key])
        if value is not None and tp is float and isinstance(value, (int, str)):
            try:
                value = float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                raise ClpError(f"{key} takes a number, not {value!r} (in {where})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ClpError(f"--{key} must be a finite number, not {value}")
        coerced[key] = value
    return cls(**coerced)


def require_flags(cls: type, args: Any, one_of: list[tuple[str, ...]] = ()) -> None:
    """Refuse a command whose flags (and ``--config`` file) leave a required field of ``cls`` unset: the fields
    without a default, and for each group in ``one_of`` at least one of its fields."""
    given = set(vars(args))
    missing = [f"--{f.name}" for f in dataclasses.fields(cls)
               if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
               and f.name not in given]
    for group in one_of:
        if not given & set(group):
            missing.append(f"--{group[0]}" + "".join(f" (or --{g})" for g in group[1:]))
    if missing:
        raise ClpError(f"missing required flags: {' '.join(missing)}")


def build_config(cls: type[C], args: Any, yaml_path: str | Path | None = None) -> C:
    """Defaults < YAML file < flags given on the command line (``args`` holds both when the command's parser
    read its ``--config``; ``yaml_path`` reads one more file below the flags)."""
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(load_yaml(yaml_path))
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_dict(cls, values, where=str(yaml_path) if yaml_path else "flags")


def to_yaml(config: Any) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return yaml.safe_dump({k: plain(v) for k, v in dataclasses.asdict(config).items()}, sort_keys=False)
