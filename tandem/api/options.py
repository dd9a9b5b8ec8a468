"""Command-line options derived from a pydantic model, and the model written back as options.

`tandem serve`'s options are the fields of `tandem.api.serving.ServerOptions`: the CLI parses them with
`add_options` / `parse_options`, the operator writes them with `to_options`. A field is declared once
(name, type, default, help), so the two sides cannot drift: a default changed in the model changes the
CLI, the pods' command lines and the server's effective configuration together.

Why not a library: argparse is what every `tandem` subcommand uses (one `--help` style, lazy imports);
pydantic-settings' CLI source would bring a second parser with its own conventions for one command.

Nested models become option groups (their docstring is the group's title) and their leaf fields become
`--kebab-case` options: leaf names must be unique across the whole model.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterator, Sequence
from enum import Enum
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from tandem.errors import UserError

ON_OFF = ("on", "off")
M = TypeVar("M", bound=BaseModel)


def _leaves(
    model: type[BaseModel], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _leaves(kind, (*path, name))
        else:
            yield (*path, name), info


def option_name(path: tuple[str, ...]) -> str:
    """`("batching", "max_batch_size")` -> `--max-batch-size` (the leaf's name)."""
    return "--" + path[-1].replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; anything else as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_sequence(kind: Any) -> bool:
    return get_origin(kind) in (list, tuple, Sequence)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return ON_OFF[0] if value else ON_OFF[1]
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _help(info: FieldInfo) -> str:
    text = (info.description or "").strip().rstrip(".")
    if info.is_required():
        return f"{text} (required)"
    default = info.get_default(call_default_factory=True)
    return text if default is None else f"{text} (default {_shown(default)})"


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per leaf field of `model`, grouped by sub-model; unset options stay unset (SUPPRESS),
    so the model's own defaults apply."""
    groups: dict[tuple[str, ...], Any] = {}
    seen: set[str] = set()
    for path, info in _leaves(model):
        flag = option_name(path)
        if flag in seen:
            raise ValueError(f"{model.__name__}: two fields would be {flag}")
        seen.add(flag)
        owner = path[:-1]
        if owner not in groups:
            title = _group_title(model, owner)
            groups[owner] = parser.add_argument_group(title) if owner else parser
        kind = _base_type(info.annotation)
        kwargs: dict[str, Any] = {"help": _help(info), "default": argparse.SUPPRESS, "dest": ".".join(path)}
        if info.is_required():
            kwargs["required"] = True
        if kind is bool:
            kwargs |= {"choices": ON_OFF, "nargs": "?", "const": ON_OFF[0], "metavar": "on|off"}
        elif isinstance(kind, type) and issubclass(kind, Enum):
            kwargs["choices"] = [str(member.value) for member in kind]
        elif _is_sequence(kind):
            kwargs["metavar"] = "N[,N...]"
        groups[owner].add_argument(flag, **kwargs)


def _group_title(model: type[BaseModel], owner: tuple[str, ...]) -> str:
    current: type[BaseModel] = model
    for name in owner:
        current = current.model_fields[name].annotation  # type: ignore[assignment]
    return (current.__doc__ or owner[-1]).strip().splitlines()[0].rstrip(".")


def parse_options(model: type[M], args: argparse.Namespace) -> M:
    """The model from parsed options; a `UserError` naming the option for any invalid value."""
    data: dict[str, Any] = {}
    flags: dict[tuple[str, ...], str] = {}
    for path, info in _leaves(model):
        key = ".".join(path)
        flags[path] = option_name(path)
        if not hasattr(args, key):
            continue
        value: Any = getattr(args, key)
        kind = _base_type(info.annotation)
        if kind is bool:
            value = value == ON_OFF[0]
        elif _is_sequence(kind):
            text = str(value).strip()
            value = [] if text == "none" else [part.strip() for part in text.split(",") if part.strip()]
        target = data
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError("; ".join(_describe(error, flags) for error in exc.errors())) from None


def _describe(error: Any, flags: dict[tuple[str, ...], str]) -> str:
    """The error with the option's name; a rule across fields names them as `spec.x.fieldName` (the
    resource's wording), which becomes the options' names here."""
    location = tuple(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    for path, flag in flags.items():
        if location[: len(path)] == path:
            return f"{flag}: {message}"
    for path, flag in sorted(flags.items(), key=lambda item: -len(".".join(item[0]))):
        message = message.replace("spec." + ".".join(to_camel(p) for p in path), flag)
    return message


def to_options(value: BaseModel) -> list[str]:
    """`value` as command-line options: only fields that differ from their default, so the server's
    defaults (the same model's) fill the rest."""
    out: list[str] = []
    explicit = value.model_dump(exclude_defaults=True, by_alias=False)
    for path, _info in _leaves(type(value)):
        node: Any = explicit
        for name in path:
            if not isinstance(node, dict) or name not in node:
                break
            node = node[name]
        else:
            out += [option_name(path), _shown(_attribute(value, path))]
    return out


def _attribute(value: BaseModel, path: tuple[str, ...]) -> Any:
    node: Any = value
    for name in path:
        node = getattr(node, name)
    return node
