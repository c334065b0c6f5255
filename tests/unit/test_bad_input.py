"""Bad input is refused with its field path and reason, never a crash (a
first slice of issue 17's fuzzing: the cases that used to raise)."""
from __future__ import annotations

import json
import sys

import pytest

from kmesh.config import bootstrap
from kmesh.config.errors import ConfigError


def _with_filter_type(type_url: str) -> str:
    return json.dumps({"static_resources": {"listeners": [{
        "name": "l", "address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}},
        "filter_chains": [{"filters": [{"name": "x", "typed_config": {"@type": type_url}}]}]}]}})


@pytest.mark.parametrize("type_url, reason", [
    ("", "missing '@type'"),
    ("x", "unknown type 'x'"),
    ("type.googleapis.com/", "unknown type 'type.googleapis.com/'"),
    ("type.googleapis.com/.", "unknown type"),
    ("type.googleapis.com/os.system", "unknown type"),
])
def test_a_typed_config_naming_no_message_is_refused(type_url, reason):
    with pytest.raises(ConfigError) as e:
        bootstrap.parse_text(_with_filter_type(type_url), "bad.json")
    assert "bad.json: static_resources.listeners[0].filter_chains[0].filters[0].typed_config.@type: " in str(e.value)
    assert reason in str(e.value)


def test_a_type_name_never_imports_a_module_outside_the_protos():
    sys.modules.pop("wave", None)   # a stdlib module nothing here imports
    with pytest.raises(ConfigError):
        bootstrap.parse_text(_with_filter_type("type.googleapis.com/wave.Wave_read"), "bad.json")
    assert "wave" not in sys.modules
