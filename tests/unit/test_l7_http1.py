"""HTTP/1.1 framing for keep-alive connections routed per request
(src/kmesh/l7/http1.py): where each message ends, over real socket pairs."""
from __future__ import annotations

import asyncio
import socket

import pytest

from kmesh.l7 import http1


def head(text: str) -> http1.Head:
    return http1.parse(text.replace("\n", "\r\n").encode() + b"\r\n")


@pytest.mark.parametrize("text, framing", [
    ("GET / HTTP/1.1\nHost: x\n", http1.Framing("none")),
    ("POST / HTTP/1.1\nContent-Length: 5\n", http1.Framing("length", 5)),
    ("POST / HTTP/1.1\nContent-Length: 5, 5\n", http1.Framing("length", 5)),
    ("POST / HTTP/1.1\nTransfer-Encoding: gzip, chunked\n", http1.Framing("chunked")),
])
def test_request_framing(text, framing):
    assert http1.request_framing(head(text)) == framing


@pytest.mark.parametrize("text", [
    "POST / HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n",   # smuggling
    "POST / HTTP/1.1\nContent-Length: 5, 6\n",
    "POST / HTTP/1.1\nContent-Length: -1\n",
    "POST / HTTP/1.1\nTransfer-Encoding: gzip\n",
    "GET / HTTP/1.1\n bad: folded\n",
])
def test_requests_that_cannot_be_framed_are_refused(text):
    with pytest.raises(http1.FramingError):
        http1.request_framing(head(text))


@pytest.mark.parametrize("method, text, kind", [
    ("GET", "HTTP/1.1 200 OK\nContent-Length: 3\n", "length"),
    ("HEAD", "HTTP/1.1 200 OK\nContent-Length: 3\n", "none"),
    ("GET", "HTTP/1.1 204 No Content\n", "none"),
    ("GET", "HTTP/1.1 304 Not Modified\nContent-Length: 3\n", "none"),
    ("GET", "HTTP/1.1 100 Continue\n", "none"),
    ("GET", "HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n", "chunked"),
    ("GET", "HTTP/1.1 200 OK\n", "close"),
])
def test_response_framing(method, text, kind):
    assert http1.response_framing(head(text), method).kind == kind


@pytest.mark.parametrize("text, keep", [
    ("GET / HTTP/1.1\n", True), ("GET / HTTP/1.1\nConnection: close\n", False),
    ("GET / HTTP/1.0\n", False), ("GET / HTTP/1.0\nConnection: keep-alive\n", True),
    ("HTTP/1.1 200 OK\nConnection: Keep-Alive, Close\n", False),
])
def test_keep_alive(text, keep):
    assert head(text).keep_alive() is keep


def _through(data: bytes, chunk: int, body) -> tuple[object, bytes, bytes]:
    """Feed ``data`` in pieces of ``chunk`` bytes to a Reader; ``body(reader,
    dst)`` reads from it: (what it returned, what reached dst, what is left)."""
    async def run():
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        for s in (a, b, c, d):
            s.setblocking(False)
        loop = asyncio.get_running_loop()
        for i in range(0, len(data), chunk):
            await loop.sock_sendall(a, data[i:i + chunk])
        r = http1.Reader(b)
        got = await body(r, c)
        out = b""
        while True:
            try:
                out += d.recv(65536)
            except BlockingIOError:
                break
        left = bytes(r.buf)
        for s in (a, b, c, d):
            s.close()
        return got, out, left
    return asyncio.run(run())


def _copy(data: bytes, framing: http1.Framing, chunk: int) -> tuple[bytes, bytes]:
    """(what one body forwarded, what is left)."""
    _, out, left = _through(data, chunk, lambda r, dst: http1.copy_body(r, dst, framing))
    return out, left


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_a_chunked_body_is_forwarded_as_sent_and_ends_where_it_ends(chunk):
    body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: y\r\n\r\n"
    assert _copy(body + b"GET /next", http1.Framing("chunked"), chunk) == (body, b"GET /next")


def test_a_sized_body_ends_at_its_length():
    assert _copy(b"hello" + b"GET /next", http1.Framing("length", 5), 2) == (b"hello", b"GET /next")


def test_a_bad_chunk_size_is_a_framing_error():
    with pytest.raises(http1.FramingError):
        _copy(b"zz\r\nhello\r\n", http1.Framing("chunked"), 100)


def _held(data: bytes, framing: http1.Framing, limit: int) -> tuple[bytes, http1.Framing | None, bytes, bytes]:
    """read_body over ``data``, then copy_body of the rest with the framing
    it returns: (held, rest framing, the rest as forwarded, what is left)."""
    async def body(r, dst):
        held, rest = await http1.read_body(r, framing, limit)
        if rest is not None:
            await http1.copy_body(r, dst, rest)
        return held, rest
    (held, rest), out, left = _through(data, len(data), body)
    return held, rest, out, left


CHUNKED = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def test_a_body_within_the_limit_is_held_whole():
    assert _held(CHUNKED + b"GET /", http1.Framing("chunked"), 1024) == (CHUNKED, None, b"", b"GET /")
    assert _held(b"hello" + b"GET /", http1.Framing("length", 5), 5) == (b"hello", None, b"", b"GET /")


def test_a_body_over_the_limit_is_held_in_part_and_the_rest_follows_as_sent():
    # Over the limit inside the second chunk: held up to its size line, the
    # rest (that chunk's data first) forwarded with copy_body.
    held, rest, out, left = _held(CHUNKED + b"GET /", http1.Framing("chunked"), 14)
    assert held + out == CHUNKED and left == b"GET /"
    assert held == b"5\r\nhello\r\n6\r\n" and rest == http1.Framing("chunked", 8)
    # A sized body over the limit is not read at all.
    assert _held(b"hello" + b"GET /", http1.Framing("length", 5), 4) == (b"", http1.Framing("length", 5), b"hello",
                                                                            b"GET /")
