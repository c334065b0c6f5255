"""Every field of the messages that shape HTTP traffic is enforced, refused
or warned (kmesh.config.fields), and the compilers do what that list says:
walks the protobuf descriptors, sets each field that is not enforced on an
otherwise valid config, and checks that it is reported at its path, as a
problem when refused and as a note when warned."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor as FD

from kmesh.config import fields
from kmesh.config.bootstrap import LoadedConfig
from kmesh.config.errors import ConfigError
from kmesh.config.builder import translate_bootstrap
from kmesh.config.http import rbac, routes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("message", fields.MESSAGES, ids=lambda m: m.DESCRIPTOR.name)
def test_every_field_is_classified(message):
    known = set(fields.of(message))
    declared = {f.name for f in message.DESCRIPTOR.fields}
    assert declared - known == set(), f"classify these in kmesh.config.fields: {sorted(declared - known)}"
    assert known - declared == set(), f"no such fields: {sorted(known - declared)}"
    for name, (status, why) in fields.of(message).items():
        assert status in (fields.ENFORCED, fields.REFUSED, fields.WARNED), name
        assert status == fields.ENFORCED or why, f"{name}: a refused or warned field says why"


def test_docs_table_is_generated_from_the_list():
    doc = (ROOT / "docs" / "l7.md").read_text()
    got = re.search(r"<!-- fields:begin -->\n(.*?)<!-- fields:end -->", doc, re.S)
    assert got, "docs/l7.md lacks the generated field table"
    assert got.group(1).strip() == fields.markdown().strip(), \
        "docs/l7.md's field table is stale: regenerate it (python -m kmesh.config.fields)"


# --------------------------------------------------------------------------
# Setting one field
# --------------------------------------------------------------------------

def _set(msg, f) -> None:
    """Give ``msg``'s field ``f`` some value (presence is what counts)."""
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value_field = f.message_type.fields_by_name["value"]
        m = getattr(msg, f.name)
        if value_field.message_type is not None:
            m["x"].SetInParent()
        else:
            m["x"] = "x" if value_field.type == FD.TYPE_STRING else 1
        return
    if f.is_repeated:
        if f.message_type is not None:
            getattr(msg, f.name).add()
        else:
            getattr(msg, f.name).append(_scalar(f))
        return
    if f.message_type is not None:
        getattr(msg, f.name).SetInParent()
    else:
        setattr(msg, f.name, _scalar(f))


def _scalar(f):
    if f.type == FD.TYPE_BOOL:
        return True
    if f.type == FD.TYPE_STRING:
        return "x"
    if f.type == FD.TYPE_BYTES:
        return b"x"
    if f.type == FD.TYPE_ENUM:
        values = f.enum_type.values
        return values[1].number if len(values) > 1 else values[0].number
    if f.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return 1.0
    return 1


def _unenforced(message):
    return [(n, s) for n, (s, _) in fields.of(message).items() if s != fields.ENFORCED]


def _compile_rc(rc) -> tuple[list, list]:
    problems, notes = [], []
    routes.compile_routes(rc, "rc", lambda p, r: problems.append(p), lambda p, r: notes.append(p))
    return problems, notes


def _base_rc(weighted: bool = False):
    rc = fields.RC()
    vh = rc.virtual_hosts.add(name="vh", domains=["*"])
    r = vh.routes.add(name="r")
    r.match.prefix = "/"
    if weighted:
        r.route.weighted_clusters.clusters.add(name="c").weight.value = 1
    else:
        r.route.cluster = "c"
    return rc


def _target(rc, message):
    vh = rc.virtual_hosts[0]
    r = vh.routes[0]
    base = "rc.virtual_hosts[0].routes[0]"
    if message is fields.RC:
        return rc, "rc"
    if message is fields.VHOST:
        return vh, "rc.virtual_hosts[0]"
    if message is fields.ROUTE:
        return r, base
    if message is fields.ACTION:
        return r.route, f"{base}.route"
    if message is fields.WEIGHTED:
        return r.route.weighted_clusters, f"{base}.route.weighted_clusters"
    return r.route.weighted_clusters.clusters[0], f"{base}.route.weighted_clusters.clusters[0]"


_ROUTE_MESSAGES = (fields.RC, fields.VHOST, fields.ROUTE, fields.ACTION, fields.WEIGHTED, fields.CLUSTER_WEIGHT)


@pytest.mark.parametrize("message, name, status", [
    (m, n, s) for m in _ROUTE_MESSAGES for n, s in _unenforced(m)], ids=lambda x: getattr(x, "DESCRIPTOR", x)
    if not hasattr(x, "DESCRIPTOR") else x.DESCRIPTOR.name)
def test_route_fields_are_reported(message, name, status):
    rc = _base_rc(weighted=message in (fields.WEIGHTED, fields.CLUSTER_WEIGHT))
    msg, path = _target(rc, message)
    _set(msg, message.DESCRIPTOR.fields_by_name[name])
    problems, notes = _compile_rc(rc)
    said = problems if status == fields.REFUSED else notes
    assert any(p == f"{path}.{name}" or p.startswith(f"{path}.{name}.") or p.startswith(f"{path}.{name}[")
               for p in said), (status, problems, notes)


@pytest.mark.parametrize("name, status", _unenforced(fields.FAULT))
def test_fault_fields_are_reported(name, status):
    rc = _base_rc()
    hf = fields.FAULT()
    hf.abort.http_status = 503
    _set(hf, fields.FAULT.DESCRIPTOR.fields_by_name[name])
    a = any_pb2.Any()
    a.Pack(hf)
    rc.virtual_hosts[0].routes[0].typed_per_filter_config[routes.FAULT_FILTER].CopyFrom(a)
    problems, notes = _compile_rc(rc)
    said = problems if status == fields.REFUSED else notes
    path = f'rc.virtual_hosts[0].routes[0].typed_per_filter_config["{routes.FAULT_FILTER}"].{name}'
    assert any(p.startswith(path) for p in said), (problems, notes)


@pytest.mark.parametrize("name, status", _unenforced(fields.RBAC))
def test_rbac_fields_are_reported(name, status):
    msg = fields.RBAC()
    _set(msg, fields.RBAC.DESCRIPTOR.fields_by_name[name])
    a = any_pb2.Any()
    a.Pack(msg)
    problems, notes = [], []
    rbac.compile_rbac(a, "f", problem=lambda p, r: problems.append(p), note=lambda p, r: notes.append(p))
    said = problems if status == fields.REFUSED else notes
    assert any(p.startswith(f"f.{name}") for p in said), (problems, notes)


# --------------------------------------------------------------------------
# Through the translator: the connection manager and the cluster
# --------------------------------------------------------------------------

HCM_TYPE = "type.googleapis.com/" + fields.HCM.DESCRIPTOR.full_name


def _bootstrap(hcm_field: str | None = None, cluster_field: str | None = None) -> dict:
    hcm = {"@type": HCM_TYPE, "stat_prefix": "s", "route_config": {"virtual_hosts": [
        {"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}}
    cluster = {"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c", "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": 8080}}}}]}]}}
    return {"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "10.96.0.1", "port_value": 80}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [cluster]}}


def _translate_with(message, name: str) -> tuple[list[str], list[str]]:
    """(error paths, warning paths) of the minimal bootstrap with one field
    of its connection manager or cluster set."""
    from google.protobuf import json_format

    from envoy.config.bootstrap.v3 import bootstrap_pb2

    bs = json_format.ParseDict(_bootstrap(), bootstrap_pb2.Bootstrap())
    if message is fields.HCM:
        hcm = fields.HCM()
        bs.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(hcm)
        _set(hcm, fields.HCM.DESCRIPTOR.fields_by_name[name])
        bs.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Pack(hcm)
    else:
        _set(bs.static_resources.clusters[0], fields.CLUSTER.DESCRIPTOR.fields_by_name[name])
    try:
        mesh = translate_bootstrap(LoadedConfig("t.yaml", bs))
    except ConfigError as e:
        return [p.path for p in e.problems], []
    return [], [w.split(": ")[1] for w in mesh.warnings]


@pytest.mark.parametrize("message, name, status", [
    (m, n, s) for m in (fields.HCM, fields.CLUSTER) for n, s in _unenforced(m)],
    ids=lambda x: x if isinstance(x, str) else x.DESCRIPTOR.name)
def test_listener_and_cluster_fields_are_reported(message, name, status):
    errors, warnings = _translate_with(message, name)
    said = errors if status == fields.REFUSED else warnings
    where = ".typed_config." if message is fields.HCM else "clusters[0]."
    assert any(where + name in p for p in said), (errors, warnings)
