"""Amazon's official SP-API models (Swagger 2.0), loaded for tests that check the wire.

The models are the JSON files Amazon publishes in ``amzn/selling-partner-api-models``;
goqd vendors the two it uses in ``tests/fixtures/spapi`` (with Amazon's licence and
notice), so a clone needs nothing beside it; ``GOQD_SPAPI_DIR`` points the tests at
another copy (a newer release of the models, say). With them a test can prove that:

- a request the adapter sent names an operation of the model, carries every required
  parameter, no undeclared query parameter, and values of the declared type, enum,
  bounds and ``collectionFormat`` (``csv`` unless the model says otherwise);
- a JSON body (request or response) validates against the operation's schema.

Validation uses ``jsonschema`` (Draft 4, which Swagger 2.0 schemas are a subset of).
``strict=True`` additionally closes every object schema that declares ``properties``
but says nothing about ``additionalProperties``: a field name that is not in the model
(a typo such as ``LastUpdatedDate``) is then an error instead of passing unseen.

This module only reads the models; it never changes them and never talks to Amazon.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import jsonschema

from tests.helpers.paths import FIXTURES

ORDERS_V0 = "ordersV0.json"
LISTINGS_2021 = "listingsItems_2021-08-01.json"

_SCALAR_KEYS = (
    "type",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "items",
    "minItems",
    "maxItems",
)
_SEPARATORS = {"csv": ",", "ssv": " ", "tsv": "\t", "pipes": "|"}


def spapi_dir() -> Path | None:
    """``$GOQD_SPAPI_DIR`` if set and holding the models, else the vendored copy."""
    env = os.environ.get("GOQD_SPAPI_DIR")
    if env and (Path(env) / ORDERS_V0).is_file():
        return Path(env)
    vendored = FIXTURES / "spapi"
    if (vendored / ORDERS_V0).is_file():
        return vendored
    return None


def _format_checker() -> jsonschema.FormatChecker:
    # jsonschema checks "date-time" only with an optional extra package installed; these
    # two checkers make the result the same everywhere.
    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return "T" in value and parsed.tzinfo is not None

    @checker.checks("date", raises=ValueError)
    def _date(value: object) -> bool:
        if isinstance(value, str):
            date.fromisoformat(value)
        return True

    return checker


_FORMATS = _format_checker()


def _closed(schema: Any) -> Any:
    """A copy of ``schema`` where objects with ``properties`` refuse unknown keys."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "definitions"):
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class Operation:
    model: Model
    operation_id: str
    method: str
    template: str
    spec: dict[str, Any]

    @property
    def parameters(self) -> list[dict[str, Any]]:
        shared = self.model.doc["paths"][self.template].get("parameters", [])
        return [*shared, *self.spec.get("parameters", [])]


class Model:
    """One Swagger 2.0 model file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        self.operations: dict[str, Operation] = {}
        self._routes: list[tuple[re.Pattern[str], Operation]] = []
        for template, methods in self.doc["paths"].items():
            pattern = re.compile(
                "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            )
            for method, spec in methods.items():
                if method == "parameters":
                    continue
                op = Operation(self, spec["operationId"], method.upper(), template, spec)
                self.operations[op.operation_id] = op
                self._routes.append((pattern, op))
        self._open = {"definitions": self.doc.get("definitions", {})}
        self._strict = _closed(self._open)

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        for pattern, op in self._routes:
            if op.method != method.upper():
                continue
            found = pattern.match(path)
            if found:
                return op, found.groupdict()
        return None

    # -- schemas -------------------------------------------------------------------------

    def schema_errors(self, schema: Mapping[str, Any], instance: Any, *, strict: bool) -> list[str]:
        root = dict(self._strict if strict else self._open)
        root.update(_closed(dict(schema)) if strict else dict(schema))
        validator = jsonschema.Draft4Validator(root, format_checker=_FORMATS)
        return sorted(
            f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
            for err in validator.iter_errors(instance)
        )

    def definition_errors(self, name: str, instance: Any, *, strict: bool = True) -> list[str]:
        if name not in self.doc.get("definitions", {}):
            raise KeyError(f"{self.path.name} has no definition {name!r}")
        return self.schema_errors({"$ref": f"#/definitions/{name}"}, instance, strict=strict)

    # -- requests and responses ----------------------------------------------------------

    def request_errors(
        self,
        operation_id: str,
        *,
        query: Mapping[str, list[str]],
        path_params: Mapping[str, str] | None = None,
        body: Any = None,
        strict: bool = True,
    ) -> list[str]:
        """Everything wrong with one request to ``operation_id``, as readable strings."""
        op = self.operations[operation_id]
        errors: list[str] = []
        declared = set()
        for param in op.parameters:
            name, where = param["name"], param["in"]
            if where == "query":
                declared.add(name)
                raw = query.get(name)
                if raw is None:
                    if param.get("required"):
                        errors.append(f"query {name}: required but missing")
                    continue
                errors += self._param_errors(f"query {name}", param, raw)
            elif where == "path":
                value = (path_params or {}).get(name)
                if value is None:
                    errors.append(f"path {name}: required but missing")
                else:
                    errors += self._param_errors(f"path {name}", param, [value])
            elif where == "body":
                if body is None:
                    if param.get("required"):
                        errors.append("body: required but missing")
                    continue
                errors += [
                    f"body {e}" for e in self.schema_errors(param["schema"], body, strict=strict)
                ]
        if strict:
            errors += [
                f"query {name}: not a parameter of {operation_id}"
                for name in sorted(set(query) - declared)
            ]
        return errors

    def _param_errors(self, label: str, param: Mapping[str, Any], raw: list[str]) -> list[str]:
        kind = param.get("type", "string")
        if kind == "array":
            fmt = param.get("collectionFormat", "csv")
            if fmt == "multi":
                values: Any = list(raw)
            else:
                if len(raw) != 1:
                    return [f"{label}: given {len(raw)} times, the model wants one {fmt} list"]
                values = raw[0].split(_SEPARATORS[fmt]) if raw[0] else []
            item_kind = param.get("items", {}).get("type", "string")
            try:
                values = [_convert(item_kind, v) for v in values]
            except ValueError as exc:
                return [f"{label}: {exc}"]
        else:
            if len(raw) != 1:
                return [f"{label}: given {len(raw)} times"]
            try:
                values = _convert(kind, raw[0])
            except ValueError as exc:
                return [f"{label}: {exc}"]
        schema = {k: param[k] for k in _SCALAR_KEYS if k in param}
        if "items" in schema:
            schema["items"] = {k: v for k, v in schema["items"].items() if not k.startswith("x-")}
        return [f"{label}: {e}" for e in self.schema_errors(schema, values, strict=False)]

    def response_errors(
        self, operation_id: str, status: int, body: Any, *, strict: bool = True
    ) -> list[str]:
        op = self.operations[operation_id]
        response = op.spec.get("responses", {}).get(str(status))
        if response is None:
            return [f"{operation_id}: HTTP {status} is not a documented response"]
        schema = response.get("schema")
        if schema is None:
            return []
        return self.schema_errors(schema, body, strict=strict)


def _convert(kind: str, text: str) -> Any:
    if kind == "integer":
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"{text!r} is not an integer")
        return int(text)
    if kind == "number":
        return float(text)
    if kind == "boolean":
        if text not in ("true", "false"):
            raise ValueError(f"{text!r} is not true/false")
        return text == "true"
    return text


class Exchange(Protocol):
    """One HTTP request and the response to it, as a simulator recorded them
    (``goqd.sim.amazon.SimExchange`` has this shape)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> Mapping[str, list[str]]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def status(self) -> int: ...
    @property
    def response(self) -> bytes: ...


class SpApi:
    """Every loaded model, searchable by HTTP method and path."""

    def __init__(self, directory: Path, files: Iterable[str] = (ORDERS_V0, LISTINGS_2021)) -> None:
        self.models = {name: Model(directory / name) for name in files}

    @property
    def orders(self) -> Model:
        return self.models[ORDERS_V0]

    @property
    def listings(self) -> Model:
        return self.models[LISTINGS_2021]

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        for model in self.models.values():
            found = model.match(method, path)
            if found:
                return found
        return None

    def exchange_errors(self, exchange: Exchange, *, strict: bool = True) -> list[str]:
        """Request and response checked against the operation the path names."""
        found = self.match(exchange.method, exchange.path)
        where = f"{exchange.method} {exchange.path}"
        if found is None:
            return [f"{where}: no operation of the loaded models"]
        op, path_params = found
        body = json.loads(exchange.body) if exchange.body else None
        errors = op.model.request_errors(
            op.operation_id,
            query=exchange.query,
            path_params=path_params,
            body=body,
            strict=strict,
        )
        try:
            response = json.loads(exchange.response)
        except ValueError:
            errors.append("response is not JSON")
        else:
            errors += op.model.response_errors(
                op.operation_id, exchange.status, response, strict=strict
            )
        return [f"{where} ({op.operation_id}, HTTP {exchange.status}): {e}" for e in errors]


@cache
def load() -> SpApi | None:
    """The models, loaded once per test session; None when they cannot be found."""
    directory = spapi_dir()
    return SpApi(directory) if directory is not None else None
