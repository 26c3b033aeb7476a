"""Stripe's form encoding: ``a[b][c]=v`` nests, ``a[0]=x`` and ``a[]=x`` make lists.

Values stay strings, as on the wire; handlers coerce them with the helpers below and raise
Stripe's own validation errors (``parameter_missing``, ``parameter_invalid_integer``, ...).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from devstack.psp.errors import StripeError

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")

Params = dict[str, Any]


def _invalid(message: str, param: str) -> StripeError:
    return StripeError(400, "invalid_request_error", message, param=param, validation=True)


def decode(raw: str) -> Params:
    """Nest ``a[b][c]=v`` pairs into dicts; numeric or empty brackets become lists."""
    root: Params = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        match = _KEY.match(key)
        if match is None:
            raise _invalid(f"Invalid parameter name: {key}", key)
        path: list[str] = [match.group(1), *_PART.findall(match.group(2))]
        _insert(root, path, value, key)
    return {k: _listify(v) for k, v in root.items()}


def _insert(node: Params, path: list[str], value: str, full: str) -> None:
    head = path[0] if path[0] != "" else str(len(node))
    if len(path) == 1:
        node[head] = value
        return
    child = node.setdefault(head, {})
    if not isinstance(child, dict):
        raise _invalid(f"Invalid parameter: {full} mixes a value and a hash", full)
    _insert(child, path[1:], value, full)


def _listify(value: Any) -> Any:
    """A dict whose keys are all 0..n-1 (as sent for arrays) becomes a list."""
    if not isinstance(value, dict):
        return value
    converted = {k: _listify(v) for k, v in value.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def check_known(params: Params, allowed: set[str]) -> None:
    for name in params:
        if name not in allowed:
            raise _invalid(f"Received unknown parameter: {name}", name).with_code("parameter_unknown")


def required_str(params: Params, name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise _invalid(f"Missing required param: {name}.", name).with_code("parameter_missing")
    if not isinstance(value, str):
        raise _invalid(f"Invalid string: {name}", name).with_code("parameter_invalid_string")
    return value


def optional_str(params: Params, name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid(f"Invalid string: {name}", name).with_code("parameter_invalid_string")
    return value


def integer(params: Params, name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _invalid(f"Missing required param: {name}.", name).with_code("parameter_missing")
        return None
    if not isinstance(value, str) or not re.fullmatch(r"-?\d+", value):
        raise _invalid(f"Invalid integer: {value}", name).with_code("parameter_invalid_integer")
    return int(value)


def boolean(params: Params, name: str) -> bool | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value not in ("true", "false"):
        raise _invalid(f"Invalid boolean: {value}", name)
    return bool(value == "true")


def metadata(params: Params, name: str = "metadata") -> dict[str, str] | None:
    """Stripe metadata: a hash of strings; an empty string unsets a key (see :func:`merge_metadata`)."""
    value = params.get(name)
    if value is None:
        return None
    if value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _invalid("Invalid hash", name)
    if len(value) > 50:
        raise _invalid("Metadata can have at most 50 keys", name)
    return dict(value)


def merge_metadata(current: dict[str, str], update: dict[str, str] | None) -> dict[str, str]:
    if update is None:
        return current
    if not update:
        return {}
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def expand_paths(params: Params) -> list[str]:
    value = params.get("expand")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid("Invalid array", "expand")
    return list(value)
