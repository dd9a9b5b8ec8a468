"""The field reference in docs/api.md, generated from the same CRD schemas as manifests/crds/.

docs/api.md is written by hand except between the two marker lines, which `write_reference` fills
(`make crds`); a unit test fails when that part is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandem.operator.crdgen import RESOURCES, build_crd

BEGIN = "<!-- BEGIN GENERATED REFERENCE: make crds -->"
END = "<!-- END GENERATED REFERENCE -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    typ = str(node.get("type", "?"))
    if typ == "array":
        return f"[]{_type(node['items'])}"
    if typ == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    if node.get("format") == "date-time":
        return "time"
    return typ


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    lo, hi = node.get("minimum"), node.get("maximum")
    if lo is not None:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {hi}")
    if "maxLength" in node:
        parts.append(f"at most {node['maxLength']} chars")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(node: dict[str, Any], prefix: str, required: bool) -> list[str]:
    rows = []
    default = node.get("default")
    notes = _constraints(node)
    desc = node.get("description", "")
    if notes:
        desc = f"{desc} ({notes})" if desc else notes
    shown = "" if default is None else f"`{json.dumps(default)}`"
    if prefix:
        rows.append(
            f"| `{prefix}` | {_cell(_type(node))} | {'yes' if required else ''} | {shown} | {_cell(desc)} |"
        )
    props = node.get("properties", {})
    if node.get("type") == "array" and "properties" in node.get("items", {}):
        props = node["items"]["properties"]
        node = node["items"]
        prefix += "[]"
    req = set(node.get("required", []))
    for name, sub in props.items():
        rows += _rows(sub, f"{prefix}.{name}" if prefix else name, name in req)
    return rows


def _rules(node: dict[str, Any], path: str) -> list[str]:
    out = []
    for rule in node.get("x-kubernetes-validations", []):
        where = path + rule.get("fieldPath", "")
        out.append(f"| `{where}` | `{_cell(rule['rule'])}` | {_cell(rule['message'])} |")
    for name, sub in node.get("properties", {}).items():
        out += _rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _rules(node["items"], f"{path}[]")
    return out


def render_reference() -> str:
    """The generated part of docs/api.md (without the marker lines)."""
    out: list[str] = []
    for kind in RESOURCES:
        crd = build_crd(kind)
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        names = crd["spec"]["names"]
        out += [
            f"### {kind} reference",
            "",
            f"`{crd['spec']['group']}/{version['name']}`, plural `{names['plural']}`, "
            f"short name{'s' if len(names['shortNames']) > 1 else ''} "
            + ", ".join(f"`{s}`" for s in names["shortNames"])
            + f", category `{names['categories'][0]}`. Subresources: "
            + ", ".join(f"`{s}`" for s in version["subresources"])
            + ".",
            "",
            "Printer columns (`kubectl get`; `-o wide` adds those of priority 1):",
            "",
            "| Column | JSONPath | Type | Priority |",
            "| --- | --- | --- | --- |",
        ]
        out += [
            f"| {c['name'].upper()} | `{c['jsonPath']}` | {c['type']} | {c.get('priority', 0)} |"
            for c in version["additionalPrinterColumns"]
        ]
        for part in ("spec", "status"):
            out += [
                "",
                f"`{part}` fields:",
                "",
                "| Field | Type | Required | Default | Description |",
                "| --- | --- | --- | --- | --- |",
            ]
            out += _rows(schema["properties"][part], "", False)
        out += [
            "",
            "Validation rules (CEL, enforced by the API server; the same rules hold in the pydantic models "
            "except transition rules, which need the old object):",
            "",
            "| Field | Rule | Message |",
            "| --- | --- | --- |",
        ]
        out += _rules(schema["properties"]["spec"], "spec")
        out.append("")
    return "\n".join(out)


def _splice(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"docs/api.md needs the marker lines {BEGIN!r} and {END!r}")
    return text[: start + len(BEGIN)] + "\n\n" + render_reference() + "\n" + text[end:]


def write_reference(path: Path) -> bool:
    """Refresh the generated part of `path`; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    new = _splice(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def check_reference(path: Path) -> bool:
    """True when the generated part of `path` is up to date."""
    text = path.read_text(encoding="utf-8")
    return _splice(text) == text
