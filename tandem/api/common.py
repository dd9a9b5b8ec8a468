"""Shared pieces of the tandem.dev/v1alpha1 API: base models, quantities, placement, conditions, rules.

Every model speaks camelCase on the wire (`maxSteps`) and snake_case in Python (`max_steps`); both are
accepted on input and `model_dump()` writes camelCase. Spec models forbid unknown fields (a typo is an
error, as on the API server); status models ignore them (an older reader of a newer status keeps working).

Cross-field rules are declared once per model as `Rule`s: the CRD generator turns them into CEL
`x-kubernetes-validations` for the API server, and the model validator runs their Python `check`, so
`TrainingJobSpec.model_validate(...)` rejects the same inputs with the same message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP: Final = "tandem.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "tandem.dev/v1alpha1"
CATEGORY: Final = "tandem"

#: Longest name of a Tandem resource: child objects (Services, pods) append suffixes to it and a
#: Service name must be a DNS-1035 label of at most 63 characters.
MAX_NAME_LENGTH = 50
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# ------------------------------------------------------------------------------------------------
# Cross-field rules
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One cross-field validation rule, enforced by the API server and by pydantic alike.

    `rule` is CEL, where `self` is the object the rule belongs to (as the API server sees it, after
    defaulting). `check` is the same rule in Python over the validated model; None for transition rules
    (they need `oldSelf`, which only the API server has). `message` names the field and the fix.
    """

    rule: str
    message: str
    check: Callable[[Any], bool] | None
    field_path: str | None = None
    reason: str | None = None

    def to_validation(self) -> dict[str, Any]:
        """The `x-kubernetes-validations` entry of this rule."""
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _json_schema_extra(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    rules: Sequence[Rule] = getattr(cls, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_validation() for r in rules]


# ------------------------------------------------------------------------------------------------
# Base models
# ------------------------------------------------------------------------------------------------


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, docstrings as descriptions, declared rules."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
        extra="forbid",
        json_schema_extra=_json_schema_extra,
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        failed = [r.message for r in type(self).cel_rules if r.check is not None and not r.check(self)]
        if failed:
            raise ValueError("; ".join(failed))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, unset (None) fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SpecModel(ApiModel):
    """Base of what users write: unknown fields are errors."""


class StatusModel(ApiModel):
    """Base of what the operator writes: unknown fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------------
# Scalar types
# ------------------------------------------------------------------------------------------------

QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def parse_quantity(value: int | str) -> Decimal:
    """A quantity's value (`500m` -> 0.5, `2Gi` -> 2147483648), by the Kubernetes client's own parser:
    the one parser every part of Tandem uses, so they all round alike."""
    from kubernetes.utils import parse_quantity as parse

    return Decimal(parse(value))  # type: ignore[no-untyped-call]


def _check_quantity(value: Any) -> Any:
    if isinstance(value, (bool, float)):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity: write an integer or a string such as "
            "'500m', '1.5', '8' or '32Gi'"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"quantity {value} must not be negative")
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity: "
            "write e.g. '500m' or '2' (cpu), '512Mi' or '32Gi' (memory)"
        )
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
        }
    ),
]
"""A Kubernetes resource quantity: an integer or a string such as `500m`, `2`, `32Gi`."""

CHECKPOINT_SELECTOR_PATTERN = r"^(latest|[0-9]+)$"


def _check_checkpoint_selector(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"checkpoint must be 'latest' or a step number, not {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"checkpoint step {value} must not be negative")
    if isinstance(value, str) and not re.match(CHECKPOINT_SELECTOR_PATTERN, value):
        raise ValueError(f"checkpoint must be 'latest' or a step number, not {value!r}")
    return value


CheckpointSelector = Annotated[
    int | str,
    BeforeValidator(_check_checkpoint_selector),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "pattern": CHECKPOINT_SELECTOR_PATTERN,
            "minimum": 0,
        }
    ),
]
"""`latest` or a checkpoint's step number (an integer, or digits as a string)."""

FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A free-form object, kept as written (the API server does not prune it)."""

#: A DNS-1123 label (PVC, PriorityClass, ... names).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A DNS-1123 subdomain (most object names).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: A URI with a scheme: `scheme://rest`.
URI_PATTERN = r"^[a-z][a-z0-9+.-]*://.+$"


class Precision(StrEnum):
    """Numeric precision of the model weights and arithmetic."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


# ------------------------------------------------------------------------------------------------
# Placement: resources, node selection, tolerations
# ------------------------------------------------------------------------------------------------


class Resources(SpecModel):
    """Per-pod compute resources. Requests equal limits (Guaranteed QoS when all three are set)."""

    gpu: int = Field(default=0, ge=0, le=16)
    """Number of whole GPUs (`nvidia.com/gpu`) per pod; 0 runs on CPU."""
    cpu: Quantity | None = None
    """CPU cores, e.g. `8` or `500m`. Unset: the operator's default."""
    memory: Quantity | None = None
    """Memory, e.g. `32Gi`. Unset: the operator's default."""

    def cpu_cores(self) -> float | None:
        """`cpu` in cores (`500m` -> 0.5), parsed as Kubernetes does; None when unset."""
        return None if self.cpu is None else float(parse_quantity(self.cpu))


class TolerationOperator(StrEnum):
    """How a toleration matches a taint's value."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    """The taint effect a toleration matches; empty matches every effect."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(SpecModel):
    """A pod toleration, as in the core API (`kubectl explain pod.spec.tolerations`)."""

    key: str | None = Field(default=None, max_length=316)
    """Taint key to match; empty with operator `Exists` matches every taint."""
    operator: TolerationOperator = TolerationOperator.EQUAL
    """`Equal` (key and value match) or `Exists` (key matches, value must be empty)."""
    value: str | None = Field(default=None, max_length=63)
    """Taint value to match with operator `Equal`."""
    effect: TaintEffect | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """With effect `NoExecute`: how long the pod stays bound after the taint appears."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="tolerations[].value must be empty when tolerations[].operator is Exists",
            check=lambda t: t.operator != TolerationOperator.EXISTS or not t.value,
            field_path=".value",
        ),
        Rule(
            rule="(has(self.key) && self.key != '') || self.operator == 'Exists'",
            message="tolerations[].key may be empty only with tolerations[].operator Exists "
            "(which tolerates every taint)",
            check=lambda t: bool(t.key) or t.operator == TolerationOperator.EXISTS,
            field_path=".key",
            reason="FieldValueRequired",
        ),
        Rule(
            rule="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerations[].tolerationSeconds needs tolerations[].effect NoExecute",
            check=lambda t: t.toleration_seconds is None or t.effect == TaintEffect.NO_EXECUTE,
            field_path=".tolerationSeconds",
            reason="FieldValueForbidden",
        ),
    )


MAX_TOLERATIONS = 32

#: A label value: at most 63 characters, alphanumeric at both ends, `-`, `_` and `.` inside.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: A label key: an optional DNS-subdomain prefix and `/`, then a name like a value's (not empty).
_LABEL_KEY = re.compile(
    r"^(?:(?P<prefix>[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/)?"
    r"(?P<name>[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$"
)
MAX_NODE_SELECTOR_LABELS = 32


def _check_label_keys(selector: dict[str, str]) -> dict[str, str]:
    """The API server's rule for label keys (checked here: a CRD schema cannot constrain map keys)."""
    if len(selector) > MAX_NODE_SELECTOR_LABELS:
        raise ValueError(f"at most {MAX_NODE_SELECTOR_LABELS} labels, not {len(selector)}")
    for key in selector:
        match = _LABEL_KEY.match(key)
        if match is None or len(match["name"]) > 63 or len(match["prefix"] or "") > 253:
            shown = key if len(key) <= 80 else key[:77] + "..."
            raise ValueError(
                f"{shown!r} is not a label key: use NAME or PREFIX/NAME, NAME at most 63 characters "
                "(letters, digits, '-', '_', '.', alphanumeric at both ends), PREFIX a DNS subdomain"
            )
    return selector


LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
NodeSelector = Annotated[
    dict[str, LabelValue],
    AfterValidator(_check_label_keys),
    Field(json_schema_extra={"maxProperties": MAX_NODE_SELECTOR_LABELS}),
]
"""Node labels (key: value) a pod needs; keys and values as Kubernetes labels allow."""
Tolerations = Annotated[list[Toleration], Field(max_length=MAX_TOLERATIONS)]

GPU_PRODUCT_DESCRIPTION = (
    "GPU model to run on, matched against the node label `nvidia.com/gpu.product` "
    "(e.g. `NVIDIA-H100-80GB-HBM3`). Needs resources.gpu >= 1."
)


def gpu_product_rule(prefix: str, resources: str = "resources") -> Rule:
    """The rule 'gpuProduct needs at least one GPU', for an object holding gpuProduct and resources."""
    return Rule(
        rule=f"!has(self.gpuProduct) || (has(self.{resources}) && self.{resources}.gpu >= 1)",
        message=f"{prefix}gpuProduct needs {prefix}{resources}.gpu >= 1 "
        f"(set the GPU count, or remove {prefix}gpuProduct)",
        check=lambda o: o.gpu_product is None or getattr(o, resources).gpu >= 1,
        field_path=".gpuProduct",
    )


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The part of Kubernetes `metadata` Tandem reads; every other key is kept as is."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True, extra="allow"
    )

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, value)):
            raise ValueError(
                f"metadata.name {value!r} must be at most {MAX_NAME_LENGTH} characters of lower-case "
                "letters, digits and '-', starting with a letter and ending with a letter or digit "
                "(Tandem names Services and pods after it)"
            )
        return value


# ------------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------------


class CostAllocation(StrEnum):
    """How the containers on nodes are priced now (the operator's cost model, OpenCost's rule)."""

    USAGE = "usage"
    """Every container at max(request, measured usage): the kubelet's usage series were in Prometheus."""
    REQUESTS = "requests"
    """Every container at its requests: no usage measured (no Prometheus, or no series for these pods)."""
    MIXED = "mixed"
    """Some containers by usage, the others by their requests."""


class CostStatus(StatusModel):
    """Spend so far, the same fields for both kinds (priced by the operator's one cost model)."""

    usd: float | None = Field(default=None, ge=0)
    """Cost so far, US dollars."""
    gpu_hours: float | None = Field(default=None, ge=0)
    """GPU-hours held so far (a TrainingJob's over all its attempts)."""
    last_update_time: datetime | None = None
    """When usd and gpuHours were last brought up to date (cost accrues from here)."""
    allocation: CostAllocation | None = None
    """How vCPUs and memory are priced now: `usage` (max(request, measured usage) per container),
    `requests` (nothing measured) or `mixed`; GPUs are always priced by request (reserved whole).
    Absent while nothing runs on a node."""


# ------------------------------------------------------------------------------------------------
# Conditions
# ------------------------------------------------------------------------------------------------

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A standard Kubernetes condition (the shape of metav1.Condition)."""

    type: str = Field(max_length=316)
    """CamelCase kind of condition, e.g. `Ready`, `Complete`; unique in the list."""
    status: ConditionStatus
    """`True`, `False` or `Unknown`."""
    reason: str = Field(default="", max_length=1024)
    """CamelCase machine-readable reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details of the last transition."""
    last_transition_time: datetime | None = None
    """When `status` last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the condition was computed from."""


CONDITIONS_LIST_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def find_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of this type, or None."""
    return next((c for c in conditions if c.type == type_), None)


def set_condition(conditions: Sequence[Condition], new: Condition) -> list[Condition]:
    """A copy of `conditions` with `new` in place of the one of its type.

    `lastTransitionTime` is kept from the old condition when `status` did not change (the Kubernetes
    convention), so calling this on every reconcile is harmless.
    """
    out: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            out.append(old)
            continue
        replaced = True
        if old.status == new.status and old.last_transition_time is not None:
            out.append(new.model_copy(update={"last_transition_time": old.last_transition_time}))
        else:
            out.append(new)
    if not replaced:
        out.append(new)
    return out


# ------------------------------------------------------------------------------------------------
# Display helpers (the pre-formatted status fields behind `kubectl get` columns)
# ------------------------------------------------------------------------------------------------


def display_fraction(part: int | None, whole: int | None) -> str | None:
    """`"2/4"`; `"2"` without a whole; None without a part."""
    if part is None:
        return None if whole is None else f"0/{whole}"
    return f"{part}" if whole is None else f"{part}/{whole}"


def display_usd(usd: float | None) -> str | None:
    """`"$1.23"` (cents); under a dollar, four decimals (`"$0.0046"`), so a short CPU run's cost is seen
    to move; None when unknown."""
    if usd is None:
        return None
    return f"${usd:.4f}" if 0 < usd < 1 else f"${usd:,.2f}"


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def describe_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: `spec.batch.global: <message>`, with camelCase field paths."""
    lines = []
    for err in exc.errors():
        path = prefix + ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(
            ".[", "["
        )
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return lines
