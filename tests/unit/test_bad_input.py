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


def _cluster(**kw) -> str:
    c = {"name": "c", "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}]}]}}
    return json.dumps({"static_resources": {"clusters": [{**c, **kw}]}})


@pytest.mark.parametrize("text, path, reason", [
    (_cluster(lb_policy=99), "static_resources.clusters[0].lb_policy", "lb_policy 99 is not supported"),
    (_cluster(type=77), "static_resources.clusters[0].type", "cluster type 77 is not supported"),
    (_cluster(lb_policy=float("inf")), "static_resources.clusters[0].lb_policy", ""),
    (_cluster(load_assignment={"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1\x00", "port_value": 80}}}}]}]}),
     "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address"
     ".address", "is not an IP address"),
    ("[" * 100000 + "]" * 100000, "", "not valid YAML/JSON"),
    (json.dumps({"static_resources": {"clusters": [{"name": "c", "metadata": {"filter_metadata": {
        "x": json.loads("[" * 200 + "]" * 200)}}}]}}), "static_resources.clusters[0].metadata", "nested deeper"),
])
def test_odd_values_found_by_the_fuzzer_are_refused_with_a_path(text, path, reason):
    from kmesh.config.builder import translate_bootstrap

    with pytest.raises(ConfigError) as e:
        translate_bootstrap(bootstrap.parse_text(text, "odd.json"))
    assert f"odd.json: {path}" in str(e.value) and reason in str(e.value), str(e.value)


def test_a_damaged_typed_config_inside_an_xds_resource_is_nacked_with_its_resource():
    from envoy.config.listener.v3 import listener_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from kmesh.xds import resources as rt
    from kmesh.xds.node import NodeIdentity
    from kmesh.xds.state import AdsState

    lst = listener_pb2.Listener(name="l")
    lst.address.socket_address.address, lst.address.socket_address.port_value = "10.0.0.1", 80
    f = lst.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager")
    f.typed_config.type_url = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                               "HttpConnectionManager")
    f.typed_config.value = b"\x12\x03\xff\xfe\xfd"   # stat_prefix: not UTF-8
    resp = discovery_pb2.DiscoveryResponse(type_url=rt.LDS.url, version_info="1", nonce="n1")
    resp.resources.add().Pack(lst)
    state = AdsState(NodeIdentity("", "", "pod", "ns", "10.0.0.5").to_proto(), lambda change, full: None)
    (nack,) = [r for r in state.handle(resp) if r.type_url == rt.LDS.url]
    assert nack.response_nonce == "n1"
    assert "LDS[l]: a typed_config inside cannot be decoded" in nack.error_detail.message, nack
