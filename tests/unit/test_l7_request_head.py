"""The request as routing sees it (Envoy's :authority and :path) from the
head as sent: absolute-form targets, Host sent twice, no Host."""
import pytest

from kmesh.l7 import http1
from kmesh.l7.handoff import BadRequest, Routed, parse_head
from kmesh.config.http.headers import Context
from kmesh.config.http.routes import RouteTo


def head(target: str, *hosts: str, version: str = "HTTP/1.1") -> bytes:
    return (f"GET {target} {version}\r\n" + "".join(f"Host: {h}\r\n" for h in hosts) + "x: 1\r\n\r\n").encode()


@pytest.mark.parametrize("target, hosts, path, host, normalised", [
    ("/a?q=1", ["x"], "/a?q=1", "x", False),
    ("/a", ["x", "y"], "/a", "x,y", True),
    ("http://h/a/b?q=1", ["x"], "/a/b?q=1", "h", True),
    ("HTTP://h:81", [], "/", "h:81", True),
    ("http://h?q", ["x"], "?q", "h", True),     # Envoy: no prefix route matches it
])
def test_the_authority_and_path_routing_sees(target, hosts, path, host, normalised):
    req = parse_head(head(target, *hosts))
    assert (req.path, req.host, req.normalised) == (path, host, normalised)


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_no_host_is_a_bad_request(version):
    with pytest.raises(BadRequest):
        parse_head(head("/", version=version))


@pytest.mark.parametrize("target, hosts, sent", [
    ("http://h/a", ["x"], b"GET /a HTTP/1.1\r\nHost: h\r\nx: 1\r\n\r\n"),
    ("http://h/a", [], b"GET /a HTTP/1.1\r\nx: 1\r\nHost: h\r\n\r\n"),
    ("/a", ["x", "y"], b"GET /a HTTP/1.1\r\nHost: x,y\r\nx: 1\r\n\r\n"),
])
def test_the_head_sent_upstream_says_what_was_routed(target, hosts, sent):
    raw = head(target, *hosts)
    req = parse_head(raw)
    routed = Routed(RouteTo((("c", 1),), None, 0, None, "r", "v"), "c", Context(("10.0.0.1", 1), ("10.0.0.2", 80)),
                    (req.path, req.host))
    assert routed.upstream_head(raw, http1.parse(raw)).lower() == sent.lower()
