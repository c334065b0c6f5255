"""HTTP/1.1 message framing for the hand-off's per-request path: where a
request or response ends (RFC 9112 section 6), so that each request on a
keep-alive connection is routed on its own and bodies are carried as sent.

Bodies are forwarded byte for byte (chunked stays chunked); only their
boundaries are read here.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from kmesh.l7 import splice

READ_CHUNK = 256 * 1024


class FramingError(Exception):
    """The peer's bytes are no valid HTTP/1.1 message."""


class Reader:
    """Buffered reads from a non-blocking socket in the running loop."""

    def __init__(self, sock: socket.socket, buffered: bytes = b""):
        self.sock = sock
        self.buf = bytearray(buffered)
        self.loop = asyncio.get_running_loop()

    async def _more(self) -> bool:
        data = await splice.recv(self.loop, self.sock, READ_CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    async def head(self, limit: int) -> bytes | None:
        """A message head through its blank line; None at a clean end of
        stream (nothing buffered). FramingError past ``limit`` bytes."""
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", max(0, start - 3))
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > limit:
                raise FramingError("head too large")
            start = len(self.buf)
            if not await self._more():
                if self.buf:
                    raise FramingError("the stream ended inside a head")
                return None

    async def line(self, limit: int = 8192) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end + 2])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > limit:
                raise FramingError("line too long")
            if not await self._more():
                raise FramingError("the stream ended inside a line")

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes already buffered (no wait)."""
        part = bytes(self.buf[:n])
        del self.buf[:len(part)]
        return part

    async def copy(self, n: int, dst: socket.socket) -> None:
        """Forward exactly ``n`` bytes to ``dst``."""
        while n > 0:
            if not self.buf and not await self._more():
                raise FramingError("the stream ended inside a body")
            part = bytes(self.buf[:n])
            del self.buf[:len(part)]
            n -= len(part)
            await splice.sendall(self.loop, dst, part)

    async def copy_to_end(self, dst: socket.socket) -> None:
        """Forward until the peer closes (a response delimited by close)."""
        while True:
            if self.buf:
                part = bytes(self.buf)
                self.buf.clear()
                await splice.sendall(self.loop, dst, part)
            if not await self._more():
                return


@dataclass(frozen=True)
class Head:
    """A parsed message head: what framing and routing need."""
    start: tuple[str, str, str]          # request: method, target, version; response: version, status, reason
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get(name) for t in v.split(",") if t.strip()}

    @property
    def version(self) -> str:
        return self.start[2] if self.is_request else self.start[0]

    @property
    def is_request(self) -> bool:
        return not self.start[0].startswith("HTTP/")

    @property
    def status(self) -> int:
        return int(self.start[1])

    def keep_alive(self) -> bool:
        """Whether another message may follow on this connection."""
        conn = self.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def serialize(start: tuple[str, str, str], headers) -> bytes:
    """A message head from its start line and its headers."""
    lines = [" ".join(start).rstrip(" ") if start[2] else " ".join(start[:2])]
    lines += [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse(head: bytes) -> Head:
    """A request or response head (strict enough to frame it safely)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:   # pragma: no cover - latin-1 decodes anything
        raise FramingError("undecodable head") from None
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2:
        raise FramingError(f"bad start line {lines[0][:80]!r}")
    start = (parts[0], parts[1], parts[2] if len(parts) > 2 else "")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise FramingError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return Head(start, tuple(headers))


@dataclass(frozen=True)
class Framing:
    kind: str        # "none", "length", "chunked", "close"
    length: int = 0  # "length": the body's; "chunked": what is left of a chunk already begun


def _length(h: Head) -> Framing | None:
    te = h.get("transfer-encoding")
    cl = h.get("content-length")
    if te:
        if cl:
            raise FramingError("both Transfer-Encoding and Content-Length")   # request smuggling
        codings = [t.strip().lower() for v in te for t in v.split(",")]
        if codings[-1] != "chunked":
            return None
        return Framing("chunked")
    if cl:
        values = {v.strip() for c in cl for v in c.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise FramingError(f"bad Content-Length {cl!r}")
        return Framing("length", int(next(iter(values))))
    return Framing("none")


def request_framing(h: Head) -> Framing:
    got = _length(h)
    if got is None:
        raise FramingError("a request whose last transfer coding is not chunked")
    return got


def response_framing(h: Head, method: str) -> Framing:
    status = h.status
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return Framing("none")
    got = _length(h)
    if got is None or got.kind == "none":
        return Framing("close")
    return got


async def read_body(src: Reader, framing: Framing, limit: int) -> tuple[bytes, Framing | None]:
    """The body as sent, read whole when it fits in ``limit`` bytes:
    (bytes, None). Else (what was read, the framing of the rest, for
    copy_body); a sized body over the limit is not read at all."""
    if framing.kind == "length":
        if framing.length > limit:
            return b"", framing
        while len(src.buf) < framing.length:
            if not await src._more():
                raise FramingError("the stream ended inside a body")
        return src.take(framing.length), None
    if framing.kind != "chunked":
        return b"", None if framing.kind == "none" else framing
    out = bytearray()
    while True:
        line = await src.line()
        size = _chunk_size(line)
        out += line
        if size == 0:
            out += await _trailers(src)
            return bytes(out), None
        if len(out) + size + 2 > limit:
            return bytes(out), Framing("chunked", size + 2)   # inside this chunk: its data first
        while len(src.buf) < size + 2:
            if not await src._more():
                raise FramingError("the stream ended inside a body")
        out += src.take(size + 2)


def _chunk_size(line: bytes) -> int:
    size_text = line.split(b";", 1)[0].strip()
    try:
        return int(size_text, 16)
    except ValueError:
        raise FramingError(f"bad chunk size {size_text[:20]!r}") from None


async def _trailers(src: Reader) -> bytes:
    """The trailers after the last chunk, through the blank line."""
    out = bytearray()
    while True:
        trailer = await src.line()
        out += trailer
        if trailer == b"\r\n":
            return bytes(out)


async def copy_body(src: Reader, dst: socket.socket, framing: Framing) -> None:
    """Forward one message body, as framed, from ``src`` to ``dst``."""
    if framing.kind == "length":
        await src.copy(framing.length, dst)
    elif framing.kind == "chunked":
        if framing.length:   # the rest of a chunk begun before (read_body)
            await src.copy(framing.length, dst)
        while True:
            line = await src.line()
            size = _chunk_size(line)
            if size == 0:
                await splice.sendall(src.loop, dst, line + await _trailers(src))
                return
            await splice.sendall(src.loop, dst, line)
            await src.copy(size + 2, dst)   # the data and its CRLF
    elif framing.kind == "close":
        await src.copy_to_end(dst)
