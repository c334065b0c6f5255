"""The native L7 engine's pure pieces (src/native/l7engine.c), through its
test entry points: chunked and sized bodies found as kmesh.l7.http1 finds
them, fed whole and byte by byte, and response heads read as http1 reads
them. Needs the built library (./build.sh -b)."""
from __future__ import annotations

import ctypes

import pytest

from kmesh.l7 import engine, http1

B_NONE, B_LENGTH, B_CHUNKED, B_CLOSE = 0, 1, 2, 3
_KINDS = {"none": B_NONE, "length": B_LENGTH, "chunked": B_CHUNKED, "close": B_CLOSE}


@pytest.fixture(scope="module")
def lib():
    lib = engine.load()
    lib.kl7_test_body.restype = ctypes.c_ssize_t
    lib.kl7_test_body.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                  ctypes.POINTER(ctypes.c_int)]
    lib.kl7_test_response.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, *[ctypes.POINTER(ctypes.c_int)] * 3,
                                      ctypes.POINTER(ctypes.c_uint64)]
    return lib


def body(lib, kind: int, length: int, data: bytes, step: int = 0) -> tuple[int, bool]:
    done = ctypes.c_int()
    n = lib.kl7_test_body(kind, length, data, len(data), step, ctypes.byref(done))
    return n, bool(done.value)


def test_the_abi_matches():
    lib = engine.load()
    assert lib.kl7_abi() == engine.ABI
    assert [lib.kl7_sizeof(i) for i in range(5)] == [ctypes.sizeof(s) for s in engine._SIZES]


CHUNKED = [
    (b"5\r\nhello\r\n0\r\n\r\n", True),
    (b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\n\r\n", True),
    (b"A\r\n0123456789\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n", True),
    (b"0\r\n\r\n", True),
    (b"00000005\r\nhello\r\n0\r\n\r\n", True),
    (b"zz\r\nhello\r\n0\r\n\r\n", False),        # no hex size
    (b"5\r\nhelloXX0\r\n\r\n", False),            # no CRLF after the data
    (b"5\nhello\r\n0\r\n\r\n", False),            # a bare LF ends no size line
    (b"\r\n", False),                             # no size at all
]


@pytest.mark.parametrize("data,valid", CHUNKED)
def test_chunked_bodies_end_where_they_end_in_any_pieces(lib, data, valid):
    tail = b"GET /next HTTP/1.1\r\n\r\n"   # a pipelined request after it: not the body's
    for step in (0, 1, 2, 3, 7):
        n, done = body(lib, B_CHUNKED, 0, data + tail, step)
        if valid:
            assert (n, done) == (len(data), True), (data, step)
        else:
            assert n == -1, (data, step)


def test_sized_and_unframed_bodies(lib):
    assert body(lib, B_LENGTH, 5, b"helloGET") == (5, True)
    assert body(lib, B_LENGTH, 10, b"hello") == (5, False)
    assert body(lib, B_LENGTH, 0, b"GET") == (0, True)
    assert body(lib, B_NONE, 0, b"GET") == (0, True)
    assert body(lib, B_CLOSE, 0, b"anything") == (8, False)   # until the peer closes


RESPONSES = [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\ncontent-length: 1\r\n\r\n", "GET"),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", "GET"),
    (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n", "GET"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "GET"),
    (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", "HEAD"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "GET"),
    (b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\n x: folded\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nx : y\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n", "GET"),
]


def python_reads(head: bytes, method: str):
    """(status, keep, framing kind, length), or None: how kmesh.l7.http1 reads it."""
    try:
        resp = http1.parse(head)
        f = http1.response_framing(resp, method)
    except http1.FramingError:
        return None
    return resp.status, resp.keep_alive(), _KINDS[f.kind], f.length


@pytest.mark.parametrize("head,method", RESPONSES)
def test_response_heads_are_read_as_the_python_side_reads_them(lib, head, method):
    st, keep, framing, length = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_uint64()
    rc = lib.kl7_test_response(head, len(head), method == "HEAD", ctypes.byref(st), ctypes.byref(keep),
                               ctypes.byref(framing), ctypes.byref(length))
    native = None if rc else (st.value, bool(keep.value), framing.value, length.value)
    assert native == python_reads(head, method), head
