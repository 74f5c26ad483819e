"""The InferenceService CRD: constants, schema validation and structural defaulting.

`crd.yaml` beside this module is the single source of truth; the chart and the kustomize base
carry identical copies. Validation and defaulting here follow the API server's rules closely
enough for `splitserve operator render` to refuse what the cluster would refuse and to fill the
defaults the cluster would fill, so rendered objects match what the operator creates.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
import yaml

GROUP = "serving.splitserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
CRD_NAME = f"{PLURAL}.{GROUP}"


def crd_text() -> str:
    """The CRD file exactly as shipped (the copies in charts/ and manifests/ must equal it)."""
    return resources.files(__package__).joinpath("crd.yaml").read_text(encoding="utf-8")


@functools.cache
def _crd() -> dict[str, Any]:
    return yaml.safe_load(crd_text())


def load_crd() -> dict[str, Any]:
    """The CRD as a fresh dict (callers may mutate it)."""
    return copy.deepcopy(_crd())


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the served version, as a fresh dict."""
    for version in _crd()["spec"]["versions"]:
        if version["name"] == VERSION:
            return copy.deepcopy(version["schema"]["openAPIV3Schema"])
    raise LookupError(f"{VERSION} is missing from crd.yaml")


@dataclass(frozen=True)
class FieldError:
    """One schema violation, named by its dotted field path (e.g. ``spec.engine.blockSize``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _dotted(path: Any) -> str:
    parts: list[str] = []
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "<root>"


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(openapi_schema()))


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown fields (the API server would prune them silently: a typo would vanish)."""
    if isinstance(schema.get("properties"), dict):
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
        for sub in schema["properties"].values():
            _strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for sub in schema.get("anyOf", []):
        _strict(sub)
    return schema


def validate(obj: dict[str, Any]) -> list[FieldError]:
    """Schema violations of an InferenceService (apiVersion and kind included), sorted by path."""
    errors: list[FieldError] = []
    if obj.get("apiVersion") != API_VERSION:
        errors.append(FieldError("apiVersion", f"must be {API_VERSION!r}"))
    if obj.get("kind") != KIND:
        errors.append(FieldError("kind", f"must be {KIND!r}"))
    for error in _validator().iter_errors(obj):
        path = list(error.absolute_path)
        if error.validator == "required":
            # Name the missing field itself, not its parent object.
            path.append(error.message.split("'")[1])
        if error.validator == "additionalProperties":
            known = set(error.schema.get("properties", {}))
            for name in sorted(set(error.instance) - known):
                errors.append(FieldError(_dotted([*path, name]), "unknown field"))
            continue
        errors.append(FieldError(_dotted(path), error.message))
    return sorted(errors, key=lambda e: e.path)


def apply_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with the schema's defaults filled in, as the API server would.

    Structural defaulting: a default applies where a property is absent; defaults of nested
    properties then apply inside it (so ``engine: {}`` gains every engine default).
    """
    result = copy.deepcopy(obj)
    _default_into(result, openapi_schema())
    return result


def _default_into(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default_into(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                if name not in schema.get("properties", {}):
                    _default_into(value[name], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_into(item, schema["items"])
