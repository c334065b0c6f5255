"""kmesh.l7.targets: the L7 listener of a handed-off connection."""
from dataclasses import replace

from kmesh.l7.handoff import WARMING
from kmesh.l7.targets import Targets
from tests.support.envoy import bootstrap, cluster, hcm_listener, lb_ep
from tests.unit.test_translate import translate

HEADER_ROUTE = [{"match": {"prefix": "/", "headers": [{"name": "x", "present_match": True}]},
                 "route": {"cluster": "c"}}, {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]


def mesh(*listeners):
    return translate(bootstrap(list(listeners), [cluster("c", lb_ep("127.0.0.1", 9))]))


def test_exact_address_first_then_the_wildcard_on_the_port():
    m = mesh(hcm_listener("exact", "127.100.0.1", 80, HEADER_ROUTE), hcm_listener("any", "0.0.0.0", 80, HEADER_ROUTE))
    targets = Targets(lambda: m)
    assert targets(("127.100.0.1", 80)).listener == "exact"
    assert targets(("127.100.0.2", 80)).listener == "any"
    assert targets(("127.100.0.1", 81)) is None
    assert set(targets(("127.100.0.1", 80)).clusters) == {"c"}


def test_warming_until_the_config_is_there():
    m = mesh(hcm_listener("exact", "127.100.0.1", 80, HEADER_ROUTE))
    warm = [True]
    targets = Targets(lambda: m, lambda: warm[0])
    assert targets(("127.100.0.1", 80)) is WARMING
    warm[0] = False
    assert targets(("127.100.0.1", 80)).listener == "exact"


def test_a_rate_limit_bucket_is_kept_while_its_settings_stay():
    lst = hcm_listener("rl", "127.100.0.1", 80, HEADER_ROUTE)
    on = {"default_value": {"numerator": 100}, "runtime_key": "on"}
    lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = [{
        "name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "rl", "token_bucket": {"max_tokens": 5, "fill_interval": "1s"},
            "filter_enabled": on, "filter_enforced": on}},
        {"name": "envoy.filters.http.router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    now = [mesh(lst)]
    targets = Targets(lambda: now[0])
    first = targets(("127.100.0.1", 80)).bucket
    now[0] = replace(now[0])          # a new mesh, same listener settings
    assert targets(("127.100.0.1", 80)).bucket is first
    lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["token_bucket"][
        "max_tokens"] = 6
    now[0] = mesh(lst)
    assert targets(("127.100.0.1", 80)).bucket is not first
