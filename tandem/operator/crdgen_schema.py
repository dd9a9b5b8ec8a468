"""Pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema, and a checker for the result.

pydantic writes JSON Schema 2020-12 with `$defs`/`$ref`, `anyOf: [X, null]` for optional fields and
numeric `exclusiveMinimum`. A CRD needs a *structural* schema: everything inline, a `type` on every node
(or `x-kubernetes-int-or-string` / `x-kubernetes-preserve-unknown-fields`), no unions, OpenAPI v3.0
boolean `exclusiveMinimum`. `to_structural` converts, and fails loudly on anything it does not know, so
a model change that cannot be expressed in a CRD breaks `make crds` instead of the API server.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import PydanticUndefined, core_schema

# Output key order of every schema node: readable, and stable across runs.
KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
)
_DROPPED = frozenset({"title", "readOnly", "examples", "$schema"})
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})


class SchemaError(ValueError):
    """The pydantic schema uses something a structural CRD schema cannot express."""


class _Generator(GenerateJsonSchema):
    """pydantic's generator, plus defaults for nested models built by `default_factory`.

    A `default_factory=SomeModel` field gets the model's defaults in full as its `default` (e.g.
    `failurePolicy: {maxRestarts: 5, backoffSeconds: 10}`). Not `{}`: the API server checks each default
    against the CEL rules of its node as written, before nested defaults apply, so `{}` fails a rule
    such as `self.min <= self.max`. Other factories (lists, dicts) give no default, so optional
    collections stay absent.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                return value.model_dump(mode="json", by_alias=True, exclude_none=True)
            return NoDefault
        return super().get_default_value(schema)


def model_schema(model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
    """The structural schema of a pydantic model (mode: `validation` for specs, `serialization` to
    include computed fields, for statuses)."""
    raw = model.model_json_schema(
        by_alias=True,
        mode="serialization" if mode == "serialization" else "validation",
        schema_generator=_Generator,
    )
    return to_structural(raw, raw.get("$defs", {}))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if key == "x-kubernetes-validations" and key in merged:
            merged[key] = [*merged[key], *value]
        else:
            merged[key] = value
    return merged


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline `$ref` and collapse `anyOf: [X, null]` into X (an optional field is simply not required)."""
    node = {k: v for k, v in node.items() if k not in _DROPPED}
    if node.get("default", PydanticUndefined) is None:
        del node["default"]
    if "$ref" in node:
        ref = node.pop("$ref")
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith("#/$defs/") or name not in defs:
            raise SchemaError(f"{path}: unresolvable $ref {ref}")
        target = _resolve(defs[name], defs, path)
        # The referring property's own keys (description, default) win over the definition's.
        node = _merge(target, node)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
        if len(options) != 1:
            raise SchemaError(
                f"{path}: a union of {len(options)} types has no structural form; "
                "use one type, or an int-or-string type from api/common.py"
            )
        node = _merge(_resolve(options[0], defs, path), node)
    node.pop("$defs", None)
    for key in ("oneOf", "allOf", "not", "discriminator", "prefixItems"):
        if key in node:
            raise SchemaError(f"{path}: `{key}` has no structural form")
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Convert one pydantic JSON Schema node (and everything under it)."""
    node = _resolve(node, defs, path or "<root>")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            out[key] = " ".join(str(value).split())
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out[key] = {name: to_structural(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = to_structural(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if value is False:
                continue  # extra="forbid": the API server prunes or rejects unknown fields anyway
            if value is True:
                raise SchemaError(f"{path}: free-form objects must use FreeForm from api/common.py")
            out[key] = to_structural(value, defs, f"{path}.*")
        elif key == "required":
            out[key] = list(value)
        elif key == "x-kubernetes-validations":
            out[key] = [_order_rule(r) for r in value]
        elif key in KEY_ORDER:
            out[key] = value
        else:
            raise SchemaError(f"{path or '<root>'}: schema keyword `{key}` is not supported in a CRD")
    if out.get("type") == "object" and "properties" in out and node.get("properties"):
        # Computed (read-only) fields are serialized but never required of a writer.
        read_only = {name for name, sub in node["properties"].items() if sub.get("readOnly")}
        required = [name for name in out.get("required", []) if name not in read_only]
        if required:
            out["required"] = required
        else:
            out.pop("required", None)
    if "enum" in out and "type" not in out:
        out["type"] = _enum_type(out["enum"], path)
    return order_keys(out)


def _enum_type(values: list[Any], path: str) -> str:
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return "string"
    if kinds == {int}:
        return "integer"
    raise SchemaError(f"{path}: enum of mixed or unsupported types {sorted(map(str, kinds))}")


_RULE_KEYS = ("rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf")


def _order_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return {
        k: rule[k] for k in sorted(rule, key=lambda k: (_RULE_KEYS.index(k) if k in _RULE_KEYS else 99, k))
    }


def order_keys(node: dict[str, Any]) -> dict[str, Any]:
    """The node with its keys in KEY_ORDER (unknown keys last, sorted)."""
    rank = {k: i for i, k in enumerate(KEY_ORDER)}
    return {k: node[k] for k in sorted(node, key=lambda k: (rank.get(k, len(rank)), k))}


# ------------------------------------------------------------------------------------------------
# Structural check (also run by the generator on its own output)
# ------------------------------------------------------------------------------------------------

_FORBIDDEN = ("$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "const", "title")


def structural_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """Why `schema` is not a structural schema Kubernetes accepts; empty when it is.

    Checks what this generator could get wrong: a type (or an x-kubernetes escape) on every node,
    no references or unions, known types, objects with properties xor additionalProperties, arrays
    with items, required names that exist, boolean exclusive bounds, defaults of the node's type,
    and well-formed x-kubernetes-validations.
    """
    where = path or "<root>"
    problems: list[str] = []
    for key in _FORBIDDEN:
        if key in schema:
            problems.append(f"{where}: `{key}` is not allowed in a structural schema")
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    typ = schema.get("type")
    if typ is None and not (int_or_string or preserve):
        problems.append(f"{where}: no `type`")
    if typ is not None and typ not in _TYPES:
        problems.append(f"{where}: unknown type {typ!r}")
    if int_or_string and typ is not None:
        problems.append(f"{where}: x-kubernetes-int-or-string must not have a `type`")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: `properties` and `additionalProperties` are mutually exclusive")
    if typ != "object" and ("properties" in schema or "additionalProperties" in schema):
        problems.append(f"{where}: properties on a non-object")
    if typ == "array" and "items" not in schema:
        problems.append(f"{where}: array without `items`")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in schema and not isinstance(schema[bound], bool):
            problems.append(f"{where}: `{bound}` must be a boolean in OpenAPI v3.0")
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in props:
            problems.append(f"{where}: required field {name!r} is not a property")
    if "default" in schema and not _default_fits(schema["default"], schema):
        problems.append(f"{where}: default {schema['default']!r} does not fit type {typ!r}")
    for rule in schema.get("x-kubernetes-validations", []):
        if not isinstance(rule.get("rule"), str) or not rule.get("message"):
            problems.append(f"{where}: x-kubernetes-validations entry needs `rule` and `message`")
        if "fieldPath" in rule and not _field_path_exists(schema, rule["fieldPath"]):
            problems.append(f"{where}: fieldPath {rule['fieldPath']!r} is not a property path")
        unknown = set(rule) - set(_RULE_KEYS)
        if unknown:
            problems.append(f"{where}: unknown x-kubernetes-validations keys {sorted(unknown)}")
    for name, sub in props.items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        problems += structural_problems(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}.*")
    return problems


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _default_fits(value: Any, schema: dict[str, Any]) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, int | str) and not isinstance(value, bool)
    check = _CHECKS.get(schema.get("type", ""))
    return check is None or check(value)


def _field_path_exists(schema: dict[str, Any], field_path: str) -> bool:
    node = schema
    for name in re.findall(r"\.([A-Za-z0-9_]+)", field_path):
        node = node.get("properties", {}).get(name)
        if node is None:
            return False
    return True


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every node of a structural schema with its path (`.spec.batch.global`, `.x[]`, `.m.*`)."""
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        nodes += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}.*")
    return nodes


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server does before validation.

    A missing property with a `default` gets it (a copy); objects and list items are filled
    recursively, including objects that were themselves just defaulted (`default: {}`).
    """
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            value = dict(value)
            for name, sub in props.items():
                if name not in value and "default" in sub:
                    value[name] = copy.deepcopy(sub["default"])
                if name in value:
                    value[name] = apply_defaults(sub, value[name])
        elif isinstance(schema.get("additionalProperties"), dict):
            value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value
