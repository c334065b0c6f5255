"""Parse plain data (from YAML/JSON) into Envoy protos with exact error paths.

protobuf's JSON mapping is the schema check: unknown fields and wrong types are
rejected exactly as Envoy rejects them. Its messages, though, say little about
*where*; when it refuses, ``locate`` walks the data along the message
descriptors to name the first offending field path, in the proto field names
Envoy uses (``static_resources.clusters[1].load_assignment...``).
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any, Iterator

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

# What json_format raises for data it refuses (OverflowError: an infinite
# number where an integer or enum goes).
_REFUSALS = (json_format.ParseError, TypeError, ValueError, KeyError, AttributeError, OverflowError)

# Well-known types have their own JSON forms (strings for Duration, bare
# values for wrappers, ...): let json_format judge them as one value.
_WKT_PREFIX = "google.protobuf."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _clean(msg: str) -> str:
    """Strip json_format's 'Failed to parse X field:' chain down to the cause."""
    msg = re.sub(r"(Failed to parse \w+ field: )+", "", str(msg))
    msg = re.sub(r"\s*at \"[^\"]*\"", "", msg)
    msg = msg.split("\n Available Fields")[0]
    return msg.strip().rstrip(".") or "invalid value"


def _field(desc: Descriptor, key: str) -> FieldDescriptor | None:
    f = desc.fields_by_name.get(key)
    if f is None:
        f = next((x for x in desc.fields if x.json_name == key), None)
    return f


def _repeated(f: FieldDescriptor) -> bool:
    # protobuf >= 5.28 has is_repeated; older releases only have label.
    rep = getattr(f, "is_repeated", None)
    return rep if rep is not None else f.label == FieldDescriptor.LABEL_REPEATED


def _message_class(desc: Descriptor):
    return message_factory.GetMessageClass(desc)


def locate(data: Any, desc: Descriptor, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield (field path, reason) for what json_format would refuse in ``data``."""
    if desc.full_name.startswith(_WKT_PREFIX) and desc.full_name != "google.protobuf.Any":
        try:
            json_format.ParseDict(data, _message_class(desc)())
        except _REFUSALS as e:
            yield path, _clean(str(e))
        return
    if desc.full_name == "google.protobuf.Any":
        yield from _locate_any(data, path)
        return
    if not isinstance(data, dict):
        yield path, f"expected an object ({desc.name}), got {type(data).__name__}"
        return
    for key, value in data.items():
        fpath = _join(path, key)
        f = _field(desc, key)
        if f is None:
            yield fpath, f"unknown field '{key}' in {desc.full_name}"
            continue
        fpath = _join(path, f.name)
        if value is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                yield fpath, f"expected an object (map), got {type(value).__name__}"
                continue
            vfield = f.message_type.fields_by_name["value"]
            for k, v in value.items():
                yield from _locate_value(v, vfield, f"{fpath}[{k!r}]", desc, f.name, {k: v})
            continue
        if _repeated(f):
            if not isinstance(value, list):
                yield fpath, f"expected a list, got {type(value).__name__}"
                continue
            for i, item in enumerate(value):
                yield from _locate_value(item, f, f"{fpath}[{i}]", desc, f.name, [item])
            continue
        yield from _locate_value(value, f, fpath, desc, f.name, value)


def _locate_value(value, f: FieldDescriptor, path: str, parent: Descriptor, name: str, wrapped):
    if f.message_type is not None:
        yield from locate(value, f.message_type, path)
        return
    try:
        json_format.ParseDict({name: wrapped}, _message_class(parent)())
    except _REFUSALS as e:
        yield path, _clean(str(e))


def _locate_any(data, path: str):
    if not isinstance(data, dict):
        yield path, f"expected an object with '@type', got {type(data).__name__}"
        return
    type_url = data.get("@type")
    if not isinstance(type_url, str) or not type_url:
        yield _join(path, "@type"), "missing '@type' for a typed config"
        return
    type_name = type_url.split("/")[-1]
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        yield _join(path, "@type"), f"unknown type '{type_url}'"
        return
    body = {k: v for k, v in data.items() if k != "@type"}
    if desc.full_name.startswith(_WKT_PREFIX):
        if "value" not in body:
            yield _join(path, "value"), f"an Any holding {desc.full_name} needs its 'value'"
            return
        body = body["value"]
    yield from locate(body, desc, path)


def _type_urls(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        t = data.get("@type")
        if isinstance(t, str):
            yield t
        for v in data.values():
            yield from _type_urls(v)
    elif isinstance(data, list):
        for v in data:
            yield from _type_urls(v)


_PROTO_PACKAGES = ("envoy.", "udpa.", "xds.", "validate.", "google.protobuf", "google.rpc", "istio.")


def import_types(data: Any) -> None:
    """Import the generated modules of every ``@type`` in ``data``.

    protobuf resolves Any only against imported modules; importing all of
    Envoy's hundreds up front would slow every start, so import on demand
    the package that a type name points at.
    """
    pool = descriptor_pool.Default()
    for url in set(_type_urls(data)):
        name = url.split("/")[-1]
        try:
            pool.FindMessageTypeByName(name)
            continue
        except KeyError:
            pass
        package = name.rpartition(".")[0]
        # Only the protos' own packages: a type name comes from the config
        # (a file, a POST, a control plane), and importing is running code.
        if not package.startswith(_PROTO_PACKAGES) or not all(p.isidentifier() for p in package.split(".")):
            continue
        try:
            mod = importlib.import_module(package)
        except (ImportError, ValueError):
            continue
        for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
            if info.name.endswith("_pb2"):
                try:
                    importlib.import_module(f"{package}.{info.name}")
                except ImportError:
                    pass


def parse(data: Any, message: type[Message], source: str, root: str = "") -> tuple[Message, list[tuple[str, str]]]:
    """Parse ``data`` into ``message``; returns (message, []) or (None, errors)."""
    import_types(data)
    try:
        return json_format.ParseDict(data, message()), []
    except _REFUSALS as e:
        found = list(locate(data, message.DESCRIPTOR, root))
        return None, found or [(root, _clean(str(e)))]
