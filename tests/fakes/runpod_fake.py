"""RunPod's GraphQL API on loopback, for the RunPod client's tests and the conformance suite.

`POST /graphql` with `{"query", "variables"}` and `Authorization: Bearer <key>`, answered the way
RunPod answers (shared/reference/runpod_aws_lambda_surf.md §1.2, §1.3, §1.5):

* `{"data": ...}` with HTTP 200; failures of a field (no capacity, unknown pod, a bad bid) as
  HTTP 200 with `{"data": {field: null}, "errors": [{"message", "path"}]}`;
* HTTP 400 for a document that does not parse or does not validate against the schema subset
  below (unknown field or argument, a missing sub-selection, a variable of the wrong type, an
  undeclared variable, an input field the type does not have) — so every document and variable
  the client sends is checked, not just matched by a substring;
* HTTP 401 without the right Bearer key. The fake accepts only the header form: the `?api_key=`
  query form RunPod also takes is refused here on purpose, because the client must not use it.

A small GraphQL reader (tokeniser, recursive-descent parser, validation against the types the
client uses, variable coercion, field projection) is enough; fragments, directives and block
strings are refused with HTTP 400. Error wordings marked "fake's wording" are not RunPod's
documented text; the others are quoted in the reference.

Stock is per cloud: `lowestPrice(input: {secureCloud: true})` answers the Secure Cloud's stock,
`secureCloud: false` the Community Cloud's, no `secureCloud` the type's combined `lowestPrice`.
A type's `_cloudStock` ({"SECURE": {...} | None, ...}) overrides one cloud; otherwise a cloud the
type is on shares `lowestPrice`. Create checks the stock of the cloud it deploys on.

Spot pods come back with `podType` `spot_pod_type` ("INTERRUPTABLE" by default, or "BID"; seeded
pods take `pod_type=`); both must be resumed with podBidResume. A Community Cloud pod created
without `supportPublicIp: true` gets no public TCP port (its 22/tcp is behind RunPod's network
only). `spot_create=False` removes `podRentInterruptable` from the schema, as RunPod may: a document
using it is then HTTP 400 "Cannot query field".

Pods progress per read: after create or resume `runtime` is null for `boot_steps` reads of the pod
(get or list), then appears with ports and GPUs; after stop the runtime stays for `stop_steps`
reads (the container shutting down), then is null; terminate removes the pod.

Operation names for faults and `calls()`: search (gpuTypes), get (pod), list (myself.pods),
balance (myself without pods), create (podFindAndDeployOnDemand, podRentInterruptable), stop
(podStop), start (podResume, podBidResume), destroy (podTerminate); "graphql" for a request whose
document cannot be read.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import re
import socket
import string
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from .loopback import Fault, LoopbackServer, Request, Response

NO_CAPACITY = ("There are no longer any instances available with the requested specifications. "
               "Please refresh and try again.")
NO_FREE_GPUS = "There are not enough free GPUs on the host machine to start this pod."
SOMETHING_WRONG = "Something went wrong. Please try again later or contact support."
POD_NOT_FOUND = "Pod not found."                                        # fake's wording
BID_TOO_LOW = "Your bid is below the minimum bid price for this GPU."   # fake's wording


# ============================================================================ the catalogue
def _gpu(type_id: str, display: str, memory: int, max_count: int, *, secure: float | None,
         community: float | None, secure_spot: float | None, community_spot: float | None,
         lowest: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": type_id, "displayName": display, "memoryInGb": memory, "maxGpuCount": max_count,
            "manufacturer": "Nvidia", "cudaCores": 0, "secureCloud": secure is not None,
            "communityCloud": community is not None, "securePrice": secure, "communityPrice": community,
            "secureSpotPrice": secure_spot, "communitySpotPrice": community_spot,
            "oneWeekPrice": None, "oneMonthPrice": None, "threeMonthPrice": None, "lowestPrice": lowest}


def _lowest(bid: float, price: float, stock: str | None, counts: list[int] | None) -> dict[str, Any]:
    return {"minimumBidPrice": bid, "uninterruptablePrice": price, "stockStatus": stock,
            "availableGpuCounts": counts, "gpuName": None, "gpuTypeId": None, "minMemory": 0, "minVcpu": 0}


GPU_TYPES: list[dict[str, Any]] = [
    _gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 8, secure=0.69, community=0.34, secure_spot=0.5,
         community_spot=0.2, lowest=_lowest(0.2, 0.34, "High", [1, 2, 4, 8])),
    _gpu("NVIDIA A100 80GB PCIe", "A100 80GB", 80, 8, secure=1.64, community=1.19, secure_spot=0.82,
         community_spot=0.6, lowest=_lowest(0.6, 1.19, "Medium", [1, 2])),
    _gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 8, secure=2.69, community=None, secure_spot=1.75,
         community_spot=None, lowest=_lowest(1.75, 2.69, "Low", None)),
    # a real id with hyphens: offer ids must not turn spaces into hyphens
    _gpu("NVIDIA A100-SXM4-80GB", "A100 SXM", 80, 4, secure=1.89, community=None, secure_spot=None,
         community_spot=None, lowest=_lowest(1.2, 1.89, "Low", [1, 2, 4])),
    # no lowest price at all: no stock
    _gpu("NVIDIA RTX A6000", "RTX A6000", 48, 8, secure=0.76, community=0.49, secure_spot=0.4,
         community_spot=0.25, lowest=None),
    # stock "None": no stock
    _gpu("NVIDIA L40S", "L40S", 48, 8, secure=0.86, community=0.79, secure_spot=0.5, community_spot=0.4,
         lowest=_lowest(0.4, 0.79, "None", [1])),
    # stock null: no stock
    _gpu("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", 48, 8, secure=0.88, community=0.77,
         secure_spot=0.5, community_spot=0.45, lowest=_lowest(0.45, 0.77, None, [1])),
    # sold out on the Secure Cloud only: its combined lowestPrice still shows stock
    {**_gpu("NVIDIA RTX A5000", "RTX A5000", 24, 4, secure=0.36, community=0.26, secure_spot=0.2,
            community_spot=0.15, lowest=_lowest(0.15, 0.26, "High", [1, 2])),
     "_cloudStock": {"SECURE": _lowest(0.2, 0.36, "None", [1]), "COMMUNITY": _lowest(0.15, 0.26, "High", [1, 2])}},
    # the pseudo-type RunPod lists; clients skip it
    _gpu("unknown", "unknown", 0, 1, secure=0.0, community=0.0, secure_spot=0.0, community_spot=0.0,
         lowest=_lowest(0.0, 0.0, "High", [1])),
]


# ============================================================================ a small GraphQL reader
class GraphQLInvalid(Exception):
    """A document that does not parse or validate: HTTP 400."""


class FieldError(Exception):
    """A field that failed while executing: HTTP 200 with `errors`."""


_TOKEN = re.compile(r"""
    (?P<skip>[\s,\ufeff]+|\#[^\n\r]*)
  | (?P<spread>\.\.\.)
  | (?P<punct>[!$():=@\[\]{}|&])
  | (?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<string>"(?:[^"\\\n\r]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
  | (?P<name>[_A-Za-z][_0-9A-Za-z]*)
""", re.X)


@dataclass
class Field:
    name: str
    alias: str | None
    args: dict[str, tuple]                      # name -> value node
    selections: list[Field] | None
    values: dict[str, Any] = field(default_factory=dict)   # coerced args, set by validation

    @property
    def key(self) -> str:
        return self.alias or self.name


@dataclass
class Operation:
    kind: str                                   # query | mutation
    variables: dict[str, tuple[str, tuple | None]]   # name -> (type, default node)
    selections: list[Field]


def _tokens(source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise GraphQLInvalid(f"Syntax Error: Unexpected character {source[pos]!r} at {pos}.")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "skip":
            out.append((kind, match.group()))
    return out


class _Parser:
    def __init__(self, source: str) -> None:
        self.tokens = _tokens(source)
        self.i = 0

    def peek(self, text: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        return text is None or self.tokens[self.i][1] == text

    def take(self, kind: str | None = None, text: str | None = None) -> str:
        if self.i >= len(self.tokens):
            raise GraphQLInvalid("Syntax Error: Unexpected <EOF>.")
        got_kind, got = self.tokens[self.i]
        if (kind and got_kind != kind) or (text and got != text):
            raise GraphQLInvalid(f"Syntax Error: Expected {text or kind}, found {got!r}.")
        self.i += 1
        return got

    def document(self) -> Operation:
        if not self.tokens:
            raise GraphQLInvalid("Syntax Error: Unexpected <EOF>.")
        operations = [self.operation()]
        while self.peek():
            operations.append(self.operation())
        if len(operations) != 1:
            raise GraphQLInvalid("The fake takes one operation per document.")
        return operations[0]

    def operation(self) -> Operation:
        if self.peek("{"):
            return Operation("query", {}, self.selection_set())
        kind = self.take("name")
        if kind not in ("query", "mutation"):
            raise GraphQLInvalid(f"Syntax Error: Unexpected {kind!r} (fragments and subscriptions are not "
                                 "supported).")
        if self.i < len(self.tokens) and self.tokens[self.i][0] == "name":
            self.take("name")  # the operation's name
        variables: dict[str, tuple[str, tuple | None]] = {}
        if self.peek("("):
            self.take(text="(")
            while not self.peek(")"):
                self.take(text="$")
                name = self.take("name")
                self.take(text=":")
                type_ = self.type_ref()
                default = None
                if self.peek("="):
                    self.take(text="=")
                    default = self.value()
                if name in variables:
                    raise GraphQLInvalid(f'There can be only one variable named "${name}".')
                variables[name] = (type_, default)
            self.take(text=")")
        if self.peek("@"):
            raise GraphQLInvalid("Directives are not supported by the fake.")
        return Operation(kind, variables, self.selection_set())

    def type_ref(self) -> str:
        if self.peek("["):
            self.take(text="[")
            inner = self.type_ref()
            self.take(text="]")
            type_ = f"[{inner}]"
        else:
            type_ = self.take("name")
        if self.peek("!"):
            self.take(text="!")
            type_ += "!"
        return type_

    def selection_set(self) -> list[Field]:
        self.take(text="{")
        fields = []
        while not self.peek("}"):
            if self.i < len(self.tokens) and self.tokens[self.i][0] == "spread":
                raise GraphQLInvalid("Fragments are not supported by the fake.")
            fields.append(self.field())
        self.take(text="}")
        if not fields:
            raise GraphQLInvalid("Syntax Error: Expected Name, found '}'.")
        return fields

    def field(self) -> Field:
        name = self.take("name")
        alias = None
        if self.peek(":"):
            self.take(text=":")
            alias, name = name, self.take("name")
        args: dict[str, tuple] = {}
        if self.peek("("):
            self.take(text="(")
            while not self.peek(")"):
                arg = self.take("name")
                self.take(text=":")
                args[arg] = self.value()
            self.take(text=")")
            if not args:
                raise GraphQLInvalid("Syntax Error: Expected Name, found ')'.")
        if self.peek("@"):
            raise GraphQLInvalid("Directives are not supported by the fake.")
        selections = self.selection_set() if self.peek("{") else None
        return Field(name, alias, args, selections)

    def value(self) -> tuple:
        if self.i >= len(self.tokens):
            raise GraphQLInvalid("Syntax Error: Unexpected <EOF>.")
        kind, text = self.tokens[self.i]
        if text == "$":
            self.i += 1
            return ("var", self.take("name"))
        if text == "[":
            self.i += 1
            items = []
            while not self.peek("]"):
                items.append(self.value())
            self.take(text="]")
            return ("list", items)
        if text == "{":
            self.i += 1
            fields: dict[str, tuple] = {}
            while not self.peek("}"):
                key = self.take("name")
                self.take(text=":")
                fields[key] = self.value()
            self.take(text="}")
            return ("obj", fields)
        self.i += 1
        if kind == "number":
            return ("lit", float(text) if any(c in text for c in ".eE") else int(text))
        if kind == "string":
            return ("lit", json.loads(text))
        if kind == "name":
            if text in ("true", "false"):
                return ("lit", text == "true")
            if text == "null":
                return ("lit", None)
            return ("enum", text)
        raise GraphQLInvalid(f"Syntax Error: Unexpected {text!r}.")


# --- the schema subset the client uses (names from the reference, §1.2-1.3) ----------------------
_LAUNCH_FIELDS = {
    "cloudType": "CloudTypeEnum", "gpuTypeId": "String!", "gpuCount": "Int!", "volumeInGb": "Int",
    "containerDiskInGb": "Int", "minVcpuCount": "Int", "minMemoryInGb": "Int", "name": "String",
    "imageName": "String!", "dockerArgs": "String", "ports": "String",
    "env": "[EnvironmentVariableInput]", "volumeMountPath": "String", "startSsh": "Boolean",
    "supportPublicIp": "Boolean", "dataCenterId": "String", "countryCode": "String", "templateId": "String",
    "networkVolumeId": "String", "allowedCudaVersions": "[String]", "minDownload": "Int", "minUpload": "Int",
}
INPUTS: dict[str, dict[str, str]] = {
    # the two documented variable types, and object literals for the rest
    "PodFindAndDeployOnDemandInput": _LAUNCH_FIELDS,
    "PodRentInterruptableInput": {**_LAUNCH_FIELDS, "bidPerGpu": "Float!"},
    "EnvironmentVariableInput": {"key": "String!", "value": "String!"},
    "GpuTypeFilter": {"id": "String"},
    "GpuLowestPriceInput": {"gpuCount": "Int", "secureCloud": "Boolean", "minMemoryInGb": "Int",
                            "minVcpuCount": "Int", "totalDisk": "Int", "allowedCudaVersions": "[String]"},
    "PodFilter": {"podId": "String!"},
    "PodStopInput": {"podId": "String!"},
    "PodResumeInput": {"podId": "String!", "gpuCount": "Int"},
    "PodBidResumeInput": {"podId": "String!", "bidPerGpu": "Float!", "gpuCount": "Int"},
    "PodTerminateInput": {"podId": "String!"},
}
ENUMS = {"CloudTypeEnum": {"ALL", "SECURE", "COMMUNITY"}}
SCALARS = {"String", "Int", "Float", "Boolean", "ID", "Void"}
OBJECTS: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "Query": {"gpuTypes": ("[GpuType]", {"input": "GpuTypeFilter"}),
              "pod": ("Pod", {"input": "PodFilter!"}),
              "myself": ("User", {})},
    "Mutation": {"podFindAndDeployOnDemand": ("Pod", {"input": "PodFindAndDeployOnDemandInput!"}),
                 "podRentInterruptable": ("Pod", {"input": "PodRentInterruptableInput!"}),
                 "podStop": ("Pod", {"input": "PodStopInput!"}),
                 "podResume": ("Pod", {"input": "PodResumeInput!"}),
                 "podBidResume": ("Pod", {"input": "PodBidResumeInput!"}),
                 "podTerminate": ("Void", {"input": "PodTerminateInput!"})},
}


def _scalars(type_: str, *names: str) -> dict[str, tuple[str, dict[str, str]]]:
    return {n: (type_, {}) for n in names}


OBJECTS.update({
    "User": {**_scalars("String", "id"), **_scalars("Float", "clientBalance"), "pods": ("[Pod]", {})},
    "GpuType": {**_scalars("String", "id", "displayName", "manufacturer"),
                **_scalars("Int", "memoryInGb", "maxGpuCount", "cudaCores"),
                **_scalars("Boolean", "secureCloud", "communityCloud"),
                **_scalars("Float", "securePrice", "communityPrice", "secureSpotPrice", "communitySpotPrice",
                           "oneWeekPrice", "oneMonthPrice", "threeMonthPrice"),
                "lowestPrice": ("LowestPrice", {"input": "GpuLowestPriceInput"})},
    "LowestPrice": {**_scalars("Float", "minimumBidPrice", "uninterruptablePrice"),
                    **_scalars("String", "stockStatus", "gpuName", "gpuTypeId"),
                    **_scalars("Int", "minMemory", "minVcpu"), "availableGpuCounts": ("[Int]", {})},
    "Pod": {**_scalars("String", "id", "name", "desiredStatus", "imageName", "lastStatusChange", "machineId",
                       "volumeMountPath", "podType", "ports", "dockerArgs"),
            **_scalars("Float", "costPerHr"),
            **_scalars("Int", "gpuCount", "memoryInGb", "vcpuCount", "volumeInGb", "containerDiskInGb",
                       "uptimeSeconds"),
            "env": ("[String]", {}), "machine": ("Machine", {}), "runtime": ("Runtime", {})},
    "Machine": _scalars("String", "gpuDisplayName", "location", "podHostId"),
    "Runtime": {**_scalars("Int", "uptimeInSeconds"), "ports": ("[RuntimePort]", {}),
                "gpus": ("[RuntimeGpu]", {}), "container": ("RuntimeContainer", {})},
    "RuntimePort": {**_scalars("String", "ip", "type"), **_scalars("Boolean", "isIpPublic"),
                    **_scalars("Int", "privatePort", "publicPort")},
    "RuntimeGpu": {**_scalars("String", "id"), **_scalars("Float", "gpuUtilPercent", "memoryUtilPercent")},
    "RuntimeContainer": _scalars("Float", "cpuPercent", "memoryPercent"),
})


def _base(type_: str) -> str:
    return type_.replace("[", "").replace("]", "").replace("!", "")


def _coerce(value: Any, type_: str, where: str) -> Any:
    """A JSON variable value as `type_` (GraphQL input coercion)."""
    if type_.endswith("!"):
        if value is None:
            raise GraphQLInvalid(f'{where}: Expected non-nullable type "{type_}" not to be null.')
        return _coerce(value, type_[:-1], where)
    if value is None:
        return None
    if type_.startswith("["):
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, type_[1:-1], f"{where}[{i}]") for i, v in enumerate(items)]
    if type_ == "Int":
        if isinstance(value, bool) or not isinstance(value, int) or not -2**31 <= value < 2**31:
            raise GraphQLInvalid(f"{where}: Int cannot represent non-integer value: {value!r}")
        return value
    if type_ == "Float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GraphQLInvalid(f"{where}: Float cannot represent non numeric value: {value!r}")
        return float(value)
    if type_ in ("String", "ID"):
        if not isinstance(value, str):
            raise GraphQLInvalid(f"{where}: String cannot represent a non string value: {value!r}")
        return value
    if type_ == "Boolean":
        if not isinstance(value, bool):
            raise GraphQLInvalid(f"{where}: Boolean cannot represent a non boolean value: {value!r}")
        return value
    if type_ in ENUMS:
        if value not in ENUMS[type_]:
            raise GraphQLInvalid(f'{where}: Value {value!r} does not exist in "{type_}" enum.')
        return value
    if type_ in INPUTS:
        if not isinstance(value, dict):
            raise GraphQLInvalid(f'{where}: Expected type "{type_}" to be an object.')
        spec = INPUTS[type_]
        for key in value:
            if key not in spec:
                raise GraphQLInvalid(f'{where}: Field "{key}" is not defined by type "{type_}".')
        out = {}
        for key, field_type in spec.items():
            if key in value:
                out[key] = _coerce(value[key], field_type, f"{where}.{key}")
            elif field_type.endswith("!"):
                raise GraphQLInvalid(f'{where}: Field "{key}" of required type "{field_type}" was not provided.')
        return out
    raise GraphQLInvalid(f'Unknown type "{type_}".')


class _Validator:
    def __init__(self, op: Operation, variables: Any) -> None:
        if variables is not None and not isinstance(variables, dict):
            raise GraphQLInvalid("Variables must be provided as an Object where each property is a variable value.")
        self.op = op
        self.values: dict[str, Any] = {}
        self.used: set[str] = set()
        for name, (type_, default) in op.variables.items():
            if _base(type_) not in SCALARS | set(ENUMS) | set(INPUTS):
                raise GraphQLInvalid(f'Unknown type "{_base(type_)}".')
            supplied = variables or {}
            if name in supplied:
                self.values[name] = _coerce(supplied[name], type_, f'Variable "${name}"')
            elif default is not None:
                self.values[name] = self.literal(default, type_, f'Variable "${name}"')
            elif type_.endswith("!"):
                raise GraphQLInvalid(f'Variable "${name}" of required type "{type_}" was not provided.')

    def run(self) -> None:
        self.selections("Mutation" if self.op.kind == "mutation" else "Query", self.op.selections)
        unused = set(self.op.variables) - self.used
        if unused:
            raise GraphQLInvalid(f'Variable "${sorted(unused)[0]}" is never used.')

    def selections(self, type_name: str, fields: list[Field]) -> None:
        spec = OBJECTS[type_name]
        for f in fields:
            if f.name == "__typename":
                raise GraphQLInvalid("__typename is not supported by the fake.")
            if f.name not in spec:
                raise GraphQLInvalid(f'Cannot query field "{f.name}" on type "{type_name}".')
            field_type, arg_types = spec[f.name]
            for arg, node in f.args.items():
                if arg not in arg_types:
                    raise GraphQLInvalid(f'Unknown argument "{arg}" on field "{type_name}.{f.name}".')
                f.values[arg] = self.literal(node, arg_types[arg], f'Argument "{arg}" of "{f.name}"')
            for arg, arg_type in arg_types.items():
                if arg_type.endswith("!") and f.values.get(arg) is None:
                    raise GraphQLInvalid(f'Field "{f.name}" argument "{arg}" of type "{arg_type}" is required.')
            base = _base(field_type)
            if base in SCALARS:
                if f.selections is not None:
                    raise GraphQLInvalid(f'Field "{f.name}" must not have a selection since type '
                                         f'"{field_type}" has no subfields.')
            elif f.selections is None:
                raise GraphQLInvalid(f'Field "{f.name}" of type "{field_type}" must have a selection of subfields.')
            else:
                self.selections(base, f.selections)

    def literal(self, node: tuple, type_: str, where: str) -> Any:
        kind, payload = node
        if kind == "var":
            if payload not in self.op.variables:
                raise GraphQLInvalid(f'Variable "${payload}" is not defined.')
            self.used.add(payload)
            declared = self.op.variables[payload][0]
            if _base(declared) != _base(type_) or (type_.endswith("!") and not declared.endswith("!")
                                                    and self.op.variables[payload][1] is None):
                raise GraphQLInvalid(f'Variable "${payload}" of type "{declared}" used in position expecting '
                                     f'type "{type_}".')
            return self.values.get(payload)
        if type_.endswith("!"):
            value = self.literal(node, type_[:-1], where)
            if value is None:
                raise GraphQLInvalid(f'{where}: Expected value of type "{type_}", found null.')
            return value
        if kind == "lit" and payload is None:
            return None
        if type_.startswith("["):
            items = payload if kind == "list" else [node]
            return [self.literal(n, type_[1:-1], where) for n in items]
        if type_ in ENUMS:
            if kind != "enum" or payload not in ENUMS[type_]:
                raise GraphQLInvalid(f'{where}: Enum "{type_}" cannot represent value: {payload!r}')
            return payload
        if type_ in INPUTS:
            if kind != "obj":
                raise GraphQLInvalid(f'{where}: Expected value of type "{type_}", found {payload!r}.')
            spec = INPUTS[type_]
            out = {}
            for key, sub in payload.items():
                if key not in spec:
                    raise GraphQLInvalid(f'{where}: Field "{key}" is not defined by type "{type_}".')
                out[key] = self.literal(sub, spec[key], f"{where}.{key}")
            for key, field_type in spec.items():
                if field_type.endswith("!") and key not in out:
                    raise GraphQLInvalid(f'{where}: Field "{type_}.{key}" of required type "{field_type}" '
                                         "was not provided.")
            return out
        if kind != "lit":
            raise GraphQLInvalid(f'{where}: Expected value of type "{type_}", found {payload!r}.')
        return _coerce(payload, type_, where)


def _project(value: Any, type_: str, fields: list[Field] | None) -> Any:
    """The requested part of `value`; a callable field value is resolved with its arguments."""
    type_ = type_.rstrip("!")
    if value is None:
        return None
    if type_.startswith("["):
        return [_project(v, type_[1:-1], fields) for v in value]
    if fields is None:
        return value
    spec = OBJECTS[type_]
    out = {}
    for f in fields:
        raw = value.get(f.name)
        if callable(raw):
            raw = raw(f.values)
        out[f.key] = _project(raw, spec[f.name][0], f.selections)
    return out


_OPS = {"gpuTypes": "search", "pod": "get", "podFindAndDeployOnDemand": "create",
        "podRentInterruptable": "create", "podStop": "stop", "podResume": "start", "podBidResume": "start",
        "podTerminate": "destroy"}


def operation_name(op: Operation) -> str:
    first = op.selections[0]
    if first.name == "myself":
        return "list" if any(f.name == "pods" for f in first.selections or []) else "balance"
    return _OPS.get(first.name, "graphql")


# ============================================================================ the fake
@dataclass
class _Parsed:
    op: Operation | None
    problem: str | None


class FakeRunPod(LoopbackServer):
    def __init__(self, api_key: str = "rp_fake_key", *, latency_s: float = 0.0, boot_steps: int = 2,
                 stop_steps: int = 1, seed: int = 7, gpu_types: list[dict[str, Any]] | None = None,
                 balance: float = 123.45, spot_pod_type: str = "INTERRUPTABLE",
                 spot_create: bool = True) -> None:
        self.api_key = api_key
        self.spot_pod_type = spot_pod_type      # what podType a rented spot pod reports
        self.spot_create = spot_create          # False: podRentInterruptable is not in the schema
        self.boot_steps = boot_steps
        self.stop_steps = stop_steps
        self.gpu_types = copy.deepcopy(gpu_types if gpu_types is not None else GPU_TYPES)
        self.balance = balance
        self.pods: dict[str, dict[str, Any]] = {}
        self.missing_pod_error = False     # answer an unknown pod id with an error instead of null
        self._rng = random.Random(seed)
        self._graphql_errors: dict[str, deque[str]] = {}
        self._serial = 0
        self._local = threading.local()
        super().__init__(latency_s=latency_s)

    # --- LoopbackServer hooks ----------------------------------------------------------------
    def routes(self) -> None:
        self.route("POST", "/graphql", self._graphql, "graphql")  # the op is named by `_match` below

    def authorised(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def unauthorised(self, request: Request) -> Response:
        return Response(401, "Unauthorized", content_type="text/plain")

    def fault_response(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "capacity":
            message = NO_FREE_GPUS if request.op == "start" else NO_CAPACITY
            return Response(200, self._field_error(request, message))
        return self.unauthorised(request)

    def stop(self) -> None:
        """As the base's, without waiting out serve_forever's 0.5 s poll: a connection wakes it."""
        server = self._server
        if server is None:
            return
        closing = threading.Thread(target=server.shutdown, daemon=True)
        closing.start()
        while closing.is_alive():
            with contextlib.suppress(OSError):
                socket.create_connection(server.server_address[:2], timeout=0.2).close()
            closing.join(0.01)
        server.server_close()
        self._server = None

    # --- test hooks ----------------------------------------------------------------------------
    def graphql_error(self, op: str, message: str, *, times: int = 1) -> None:
        """The next `times` requests of `op` fail with a GraphQL error (HTTP 200) saying `message`."""
        with self._lock:
            queue = self._graphql_errors.setdefault(op, deque())
            queue.extend([message] * times)

    def forget(self, pod_id: str) -> None:
        with self._lock:
            self.pods.pop(pod_id, None)

    def set_gpu_util(self, pod_id: str, *percents: float) -> None:
        with self._lock:
            self.pods[pod_id]["_util"] = list(percents)

    def seed_pod(self, *, name: str, gpu_type_id: str = "NVIDIA GeForce RTX 4090", gpu_count: int = 1,
                 status: str = "RUNNING", ports: str = "8000/http,22/tcp", up: bool = True,
                 cost_per_hr: float = 0.69, volume_gb: int = 50, spot: bool = False,
                 pod_type: str | None = None) -> str:
        """A pod made outside the client (another tool, or a state the client cannot produce)."""
        with self._lock:
            gpu = self._type(gpu_type_id)
            pod = self._new_pod(gpu, name=name, count=gpu_count, cloud="SECURE", image="runpod/pytorch:2.4",
                                volume=volume_gb, ports=ports, spot=spot, cost=cost_per_hr,
                                docker_args="", env=[])
            pod["desiredStatus"] = status
            if pod_type is not None:
                pod["podType"] = pod_type
            pod["_up"] = up and status in ("RUNNING", "EXITED")
            if status == "RUNNING" and not pod["_up"]:
                pod["_countdown"] = self.boot_steps
            elif status == "EXITED" and pod["_up"]:
                pod["_countdown"] = self.stop_steps
            else:
                pod["_countdown"] = 0
            return pod["id"]

    # --- serving -------------------------------------------------------------------------------
    # Every operation shares one URL, and the base takes faults (and runs `after` hooks) by the op
    # its `_match` names from method and path alone. So `_serve` reads the GraphQL document first,
    # keeps the op for this handler thread, hands the same bytes to the base, and `_match` answers
    # with that op; everything else (faults, latency, auth, hooks) stays the base's.
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        parsed = self._parse(body)
        self._local.parsed = parsed
        self._local.op = operation_name(parsed.op) if parsed.op is not None else "graphql"
        connection = h.rfile
        h.rfile = io.BytesIO(raw)  # type: ignore[assignment]  # the base reads the body again
        try:
            super()._serve(h)
        finally:
            h.rfile = connection    # keep-alive: the next request comes from the socket
            self._local.parsed = None

    def _match(self, method: str, path: str) -> tuple[Any, dict[str, str], str] | None:
        found = super()._match(method, path)
        if found is None:
            return None
        handler, params, _ = found
        return handler, params, getattr(self._local, "op", None) or "graphql"

    @staticmethod
    def _parse(body: Any) -> _Parsed:
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return _Parsed(None, "Must provide query string.")
        try:
            return _Parsed(_Parser(body["query"]).document(), None)
        except GraphQLInvalid as exc:
            return _Parsed(None, str(exc))

    def _graphql(self, request: Request, params: dict[str, str]) -> Response:
        """The route: runs under the base's lock, after faults and the auth check."""
        parsed = getattr(self._local, "parsed", None) or self._parse(request.body)
        if parsed.op is None:
            return Response(400, {"errors": [{"message": parsed.problem}]})
        op = parsed.op
        if not self.spot_create and op.kind == "mutation" and any(
                f.name == "podRentInterruptable" for f in op.selections):
            return Response(400, {"errors": [{"message": 'Cannot query field "podRentInterruptable" on type '
                                                         '"Mutation".'}]})
        try:
            _Validator(op, request.body.get("variables")).run()
        except GraphQLInvalid as exc:
            return Response(400, {"errors": [{"message": str(exc)}]})
        queued = self._graphql_errors.get(request.op)
        if queued:
            return Response(200, self._field_error(request, queued.popleft()))
        root_type = "Mutation" if op.kind == "mutation" else "Query"
        data: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for f in op.selections:
            try:
                value = getattr(self, f"_resolve_{f.name}")(f.values.get("input"))
                data[f.key] = _project(value, OBJECTS[root_type][f.name][0], f.selections)
            except FieldError as exc:
                data[f.key] = None
                errors.append({"message": str(exc), "path": [f.key]})
        answer: dict[str, Any] = {"data": data}
        if errors:
            answer["errors"] = errors
        return Response(200, answer)

    def _field_error(self, request: Request, message: str) -> dict[str, Any]:
        parsed = self._parse(request.body)
        root = parsed.op.selections[0].key if parsed.op is not None else "unknown"
        return {"data": {root: None}, "errors": [{"message": message, "path": [root]}]}

    # --- resolvers -----------------------------------------------------------------------------
    def _resolve_gpuTypes(self, filt: dict[str, Any] | None) -> list[dict[str, Any]]:
        wanted = (filt or {}).get("id")
        return [self._gpu_view(g) for g in self.gpu_types if wanted is None or g["id"] == wanted]

    def _gpu_view(self, gpu: dict[str, Any]) -> dict[str, Any]:
        view = {k: copy.deepcopy(v) for k, v in gpu.items() if not k.startswith("_")}

        def lowest(args: dict[str, Any]) -> dict[str, Any] | None:
            secure = (args.get("input") or {}).get("secureCloud")
            if secure is None:
                return copy.deepcopy(gpu.get("lowestPrice"))
            return copy.deepcopy(self._stock(gpu, "SECURE" if secure else "COMMUNITY"))
        view["lowestPrice"] = lowest
        return view

    @staticmethod
    def _stock(gpu: dict[str, Any], cloud: str) -> dict[str, Any] | None:
        """One cloud's stock of a type: its own entry, else the type's shared `lowestPrice` when
        the type is on that cloud at all."""
        per_cloud = gpu.get("_cloudStock") or {}
        if cloud in per_cloud:
            return per_cloud[cloud]
        return gpu.get("lowestPrice") if gpu.get(f"{cloud.lower()}Cloud") else None

    def _resolve_pod(self, filt: dict[str, Any]) -> dict[str, Any] | None:
        pod = self.pods.get(filt["podId"])
        if pod is None:
            if self.missing_pod_error:
                raise FieldError(POD_NOT_FOUND)
            return None
        return self._pod_view(pod, observe=True)

    def _resolve_myself(self, _: Any) -> dict[str, Any]:
        return {"id": "user_fake", "clientBalance": self.balance,
                "pods": lambda args: [self._pod_view(p, observe=True) for p in self.pods.values()]}

    def _resolve_podFindAndDeployOnDemand(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._deploy(spec, spot=False)

    def _resolve_podRentInterruptable(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._deploy(spec, spot=True)

    def _spot(self, pod: dict[str, Any]) -> bool:
        return pod["podType"] in ("INTERRUPTABLE", "BID")

    def _resolve_podStop(self, spec: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod(spec["podId"])
        if pod["desiredStatus"] == "RUNNING":
            pod["desiredStatus"] = "EXITED"
            pod["_countdown"] = self.stop_steps if pod["_up"] else 0
            pod["lastStatusChange"] = f"Exited by user: {_now()}"
        return self._pod_view(pod, observe=False)

    def _resolve_podResume(self, spec: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod(spec["podId"])
        if self._spot(pod):
            raise FieldError("This pod is a spot pod; resume it with podBidResume.")  # fake's wording
        self._check_count(pod, spec.get("gpuCount"))
        gpu = self._type(pod["_gpuTypeId"])
        price = gpu["securePrice"] if pod["_cloud"] == "SECURE" else gpu["communityPrice"]
        return self._resume(pod, round(price * pod["gpuCount"], 4))

    def _resolve_podBidResume(self, spec: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod(spec["podId"])
        if not self._spot(pod):
            raise FieldError("This pod is not a spot pod.")  # fake's wording
        self._check_count(pod, spec.get("gpuCount"))
        gpu = self._type(pod["_gpuTypeId"])
        if spec["bidPerGpu"] + 1e-9 < self._floor(gpu, pod["_cloud"]):
            raise FieldError(BID_TOO_LOW)
        return self._resume(pod, round(spec["bidPerGpu"] * pod["gpuCount"], 4))

    def _resolve_podTerminate(self, spec: dict[str, Any]) -> None:
        if self.pods.pop(spec["podId"], None) is None:
            raise FieldError(POD_NOT_FOUND)
        return None

    # --- pods ------------------------------------------------------------------------------------
    def _deploy(self, spec: dict[str, Any], *, spot: bool) -> dict[str, Any]:
        gpu = next((g for g in self.gpu_types if g["id"] == spec["gpuTypeId"]), None)
        if gpu is None or gpu["id"] == "unknown":
            raise FieldError(NO_CAPACITY)
        cloud = spec.get("cloudType") or "ALL"
        count = spec["gpuCount"]

        def in_stock(c: str) -> bool:
            lowest = self._stock(gpu, c)
            if not lowest or str(lowest.get("stockStatus")) in ("None", ""):
                return False
            return count in (lowest.get("availableGpuCounts") or list(range(1, gpu["maxGpuCount"] + 1)))
        clouds = [c for c in ("SECURE", "COMMUNITY")
                  if cloud in ("ALL", c) and gpu[f"{c.lower()}Cloud"] and in_stock(c)]
        if not clouds:
            raise FieldError(NO_CAPACITY)
        cloud = min(clouds, key=lambda c: gpu[f"{c.lower()}{'SpotPrice' if spot else 'Price'}"] or 1e9)
        if spot:
            floor = self._floor(gpu, cloud)
            if spec["bidPerGpu"] + 1e-9 < floor:
                raise FieldError(BID_TOO_LOW)
            cost = round(spec["bidPerGpu"] * count, 4)
        else:
            cost = round(gpu[f"{cloud.lower()}Price"] * count, 4)
        env = [f"{e['key']}={e['value']}" for e in spec.get("env") or []]
        pod = self._new_pod(gpu, name=spec.get("name") or "", count=count, cloud=cloud, image=spec["imageName"],
                            volume=spec.get("volumeInGb") or 0, ports=spec.get("ports") or "", spot=spot,
                            cost=cost, docker_args=spec.get("dockerArgs") or "", env=env)
        pod["containerDiskInGb"] = spec.get("containerDiskInGb") or 0
        pod["volumeMountPath"] = spec.get("volumeMountPath") or "/workspace"
        pod["_public_ip"] = cloud == "SECURE" or spec.get("supportPublicIp") is True
        pod["_start_ssh"] = spec.get("startSsh") is True
        return self._pod_view(pod, observe=False)

    def _new_pod(self, gpu: dict[str, Any], *, name: str, count: int, cloud: str, image: str, volume: int,
                 ports: str, spot: bool, cost: float, docker_args: str, env: list[str]) -> dict[str, Any]:
        self._serial += 1
        alphabet = string.ascii_lowercase + string.digits
        pod_id = "".join(self._rng.choice(alphabet) for _ in range(14))
        pod = {
            "id": pod_id, "name": name, "desiredStatus": "RUNNING", "imageName": image, "env": env,
            "lastStatusChange": f"Rented by User: {_now()}", "machineId": f"m{self._serial:05d}",
            "memoryInGb": 62 * count, "vcpuCount": 16 * count, "volumeInGb": volume, "containerDiskInGb": 20,
            "volumeMountPath": "/workspace", "podType": self.spot_pod_type if spot else "RESERVED",
            "ports": ports, "dockerArgs": docker_args, "gpuCount": count, "costPerHr": cost, "uptimeSeconds": 0,
            "machine": {"gpuDisplayName": gpu["displayName"], "location": "US-OR",
                        "podHostId": f"{pod_id}-64410{self._serial:03d}"},
            "_gpuTypeId": gpu["id"], "_cloud": cloud, "_up": False, "_countdown": self.boot_steps,
            "_uptime": 0, "_util": [0.0] * count, "_serial": self._serial, "_public_ip": True,
            "_start_ssh": True,
        }
        self.pods[pod_id] = pod
        return pod

    def _resume(self, pod: dict[str, Any], cost: float) -> dict[str, Any]:
        if pod["desiredStatus"] == "EXITED":
            pod.update(desiredStatus="RUNNING", costPerHr=cost, _up=False, _countdown=self.boot_steps, _uptime=0,
                       lastStatusChange=f"Resumed by user: {_now()}")
        return self._pod_view(pod, observe=False)

    def _pod_view(self, pod: dict[str, Any], *, observe: bool) -> dict[str, Any]:
        """The pod as RunPod shows it; a read (`observe`) moves it one step on."""
        if observe:
            if pod["desiredStatus"] == "RUNNING" and not pod["_up"]:
                if pod["_countdown"] > 0:
                    pod["_countdown"] -= 1
                else:
                    pod["_up"] = True
            elif pod["desiredStatus"] == "EXITED" and pod["_up"]:
                if pod["_countdown"] > 0:
                    pod["_countdown"] -= 1
                else:
                    pod["_up"] = False
            if pod["_up"]:
                pod["_uptime"] += 10
        view = {k: copy.deepcopy(v) for k, v in pod.items() if not k.startswith("_")}
        view["uptimeSeconds"] = pod["_uptime"] if pod["_up"] else 0
        view["runtime"] = self._runtime(pod) if pod["_up"] else None
        return view

    def _runtime(self, pod: dict[str, Any]) -> dict[str, Any]:
        n = pod["_serial"]
        ports = []
        for index, item in enumerate(p for p in pod["ports"].split(",") if p.strip()):
            number, _, kind = item.strip().partition("/")
            if kind == "tcp" and not pod["_public_ip"]:     # reachable inside RunPod's network only
                ports.append({"ip": f"10.{n % 250}.0.2", "isIpPublic": False, "privatePort": int(number),
                              "publicPort": int(number), "type": "tcp"})
            elif kind == "tcp":
                ports.append({"ip": f"203.0.113.{n % 250 + 1}", "isIpPublic": True, "privatePort": int(number),
                              "publicPort": 40000 + 10 * n + index, "type": "tcp"})
            else:
                ports.append({"ip": f"100.65.{n % 250}.2", "isIpPublic": False, "privatePort": int(number),
                              "publicPort": int(number), "type": "http"})
        gpus = [{"id": f"GPU-{pod['id'][:8]}-{i}", "gpuUtilPercent": u, "memoryUtilPercent": 0.0}
                for i, u in enumerate(pod["_util"])]
        return {"uptimeInSeconds": pod["_uptime"], "ports": ports, "gpus": gpus,
                "container": {"cpuPercent": 1.0, "memoryPercent": 2.0}}

    def _pod(self, pod_id: str) -> dict[str, Any]:
        pod = self.pods.get(pod_id)
        if pod is None:
            raise FieldError(POD_NOT_FOUND)
        return pod

    def _type(self, type_id: str) -> dict[str, Any]:
        return next(g for g in self.gpu_types if g["id"] == type_id)

    @staticmethod
    def _floor(gpu: dict[str, Any], cloud: str) -> float:
        spot = gpu.get(f"{cloud.lower()}SpotPrice")
        if spot:
            return spot
        return (gpu.get("lowestPrice") or {}).get("minimumBidPrice") or 0.0

    @staticmethod
    def _check_count(pod: dict[str, Any], count: int | None) -> None:
        if count is not None and count != pod["gpuCount"]:
            raise FieldError(NO_FREE_GPUS)


def _now() -> str:
    return time.strftime("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)", time.gmtime())
