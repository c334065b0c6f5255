"""Read a config file (Envoy v3 Bootstrap, YAML or JSON) into protos."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from kmesh.config import schema
from kmesh.config import filters  # noqa: F401  (registers typed_config types)
from kmesh.config.errors import ConfigError, Problem


@dataclass(frozen=True)
class LoadedConfig:
    source: str
    bootstrap: bootstrap_pb2.Bootstrap

    def to_json(self) -> dict:
        return json_format.MessageToDict(self.bootstrap, preserving_proto_field_name=True)


# libyaml's loader: ~20x faster, and it bounds nesting itself.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# protobuf refuses messages nested deeper than this (its recursion limit);
# so does kmesh, before anything recursive walks them.
MAX_DEPTH = 100


def too_deep(data, limit: int = MAX_DEPTH) -> str | None:
    """The path of the first value nested deeper than ``limit``, or None."""
    todo = [("", data, 0)]
    while todo:
        path, node, depth = todo.pop()
        if depth > limit:
            return path
        if isinstance(node, dict):
            todo.extend((f"{path}.{k}" if path else str(k), v, depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(node))
    return None


def parse_text(text: str, source: str) -> LoadedConfig:
    """Parse YAML or JSON text (JSON is YAML); errors name ``source``."""
    try:
        data = yaml.load(text, Loader=_LOADER)
    except RecursionError:
        raise ConfigError([Problem(source, "", f"nested deeper than {MAX_DEPTH} levels")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError([Problem(source, where, f"not valid YAML/JSON: {reason}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "", f"expected an Envoy Bootstrap object, got {type(data).__name__}")])
    deep = too_deep(data)
    if deep is not None:
        raise ConfigError([Problem(source, deep, f"nested deeper than {MAX_DEPTH} levels")])
    msg, errors = schema.parse(data, bootstrap_pb2.Bootstrap, source)
    if errors:
        raise ConfigError([Problem(source, p, r) for p, r in errors])
    return LoadedConfig(source, msg)


def load_file(path: str) -> LoadedConfig:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([Problem(path, "", f"cannot read the config file: {e.strerror}")]) from None
    return parse_text(text, path)


def dumps(cfg: LoadedConfig) -> str:
    return json.dumps(cfg.to_json(), indent=2, sort_keys=True)
