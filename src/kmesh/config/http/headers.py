"""Envoy's header mutations (``request_headers_to_add`` / ``_to_remove``,
``response_headers_to_add`` / ``_to_remove``) as its HeaderParser applies
them (pure functions).

Each level that sets them (a weighted cluster, the route, the virtual host,
the route configuration) is one :class:`HeaderOps`: its removals first,
then its additions in order. The levels run from the most specific to the
least (``most_specific_header_mutations_wins`` reverses route, virtual host
and route configuration; a weighted cluster's still go first), so with
``OVERWRITE_IF_EXISTS_OR_ADD`` the route configuration's value wins by
default: checked against Envoy 1.40 on the same config and bytes.

Values are Envoy's substitution format: ``%%`` is a literal ``%``; the
commands a plaintext hand-off can answer are rendered (addresses, the
protocol, request headers); a value with any other command is not added
and reported at its field path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

# HeaderValueOption.HeaderAppendAction
APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS = 0, 1, 2, 3

Report = Callable[[str, str], None]
Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Context:
    """What a header value may refer to: the client's address, the address
    it connected to (the VIP) and the request's headers."""
    client: tuple[str, int]
    local: tuple[str, int]
    request: tuple[tuple[str, str], ...] = ()


def _addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _req(names: tuple[str, ...]) -> Callable[[Context], str]:
    def get(ctx: Context) -> str:
        for name in names:
            values = [v for n, v in ctx.request if n.lower() == name]
            if values:
                return ",".join(values)
        return "-"
    return get


_COMMANDS: dict[str, Callable[[Context], str]] = {
    "DOWNSTREAM_REMOTE_ADDRESS": lambda c: _addr(c.client),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: c.client[0],
    "DOWNSTREAM_REMOTE_PORT": lambda c: str(c.client[1]),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda c: _addr(c.client),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: c.client[0],
    "DOWNSTREAM_LOCAL_ADDRESS": lambda c: _addr(c.local),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda c: c.local[0],
    "DOWNSTREAM_LOCAL_PORT": lambda c: str(c.local[1]),
    "PROTOCOL": lambda c: "HTTP/1.1",
}
_TOKEN = re.compile(r"%%|%([A-Z_0-9]+)(?:\(([^)]*)\))?%")

Part = str | Callable[[Context], str]


def _parts(value: str) -> tuple[tuple[Part, ...] | None, str]:
    """The value as literal text and commands; (None, why) when it uses a
    command kmesh cannot render."""
    out: list[Part] = []
    pos = 0
    for m in _TOKEN.finditer(value):
        out.append(value[pos:m.start()])
        pos = m.end()
        if m.group(0) == "%%":
            out.append("%")
            continue
        cmd, arg = m.group(1), m.group(2)
        if cmd == "REQ" and arg is not None and ":" not in arg:
            out.append(_req(tuple(n.strip().lower() for n in arg.split("?"))))
        elif cmd in _COMMANDS and arg is None:
            out.append(_COMMANDS[cmd])
        else:
            return None, f"the substitution command '{m.group(0)}' is not rendered by kmesh: the header is not added"
    rest = value[pos:]
    if "%" in rest:
        return None, "an unterminated '%' substitution (write '%%' for a literal '%'): the header is not added"
    out.append(rest)
    return tuple(p for p in out if p != ""), ""


@dataclass(frozen=True, slots=True)
class _Add:
    name: str                   # lower case, as Envoy sends header names
    parts: tuple[Part, ...]
    action: int
    keep_empty: bool

    def value(self, ctx: Context) -> str:
        return "".join(p if isinstance(p, str) else p(ctx) for p in self.parts)


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """One level's removals and additions."""
    remove: frozenset[str]
    add: tuple[_Add, ...]

    def apply(self, headers: Headers, ctx: Context) -> Headers:
        """As Envoy's HeaderParser: removals; then every value is rendered
        and every condition checked against the headers as they are now;
        then the overwrites (the old values go, the new one is appended);
        then the additions."""
        if self.remove:
            headers = [h for h in headers if h[0].lower() not in self.remove]
        present = {n.lower() for n, _ in headers}
        overwrite, append = [], []
        for a in self.add:
            value = a.value(ctx)
            if not value and not a.keep_empty:
                continue
            if a.action == APPEND_IF_EXISTS_OR_ADD or a.action == ADD_IF_ABSENT and a.name not in present:
                append.append((a.name, value))
            elif a.action == OVERWRITE_IF_EXISTS_OR_ADD or a.action == OVERWRITE_IF_EXISTS and a.name in present:
                overwrite.append((a.name, value))
        for name, value in overwrite:
            headers = [h for h in headers if h[0].lower() != name]
            headers.append((name, value))
        return headers + append if append else headers


def apply(levels: Iterable[HeaderOps], headers: Sequence[tuple[str, str]], ctx: Context) -> Headers:
    """``headers`` after every level, in order."""
    out = list(headers)
    for ops in levels:
        out = ops.apply(out, ctx)
    return out


def _modifiable(name: str) -> bool:
    """Envoy's isModifiableHeader: no pseudo-header, not Host."""
    return bool(name) and name[0] != ":" and name.lower() != "host"


_OPTION_FIELDS = ("header", "append", "append_action", "keep_empty_value")


def compile_ops(adds: Sequence, removes: Sequence[str], path: str, add_field: str, remove_field: str,
                problem: Report, note: Report) -> HeaderOps | None:
    """The HeaderOps of one level (None when it sets nothing); ``adds`` are
    HeaderValueOptions at ``path.add_field``. Each field kmesh cannot apply
    is reported: ``problem`` for what Envoy refuses, else ``note``."""
    out = []
    for i, opt in enumerate(adds):
        apath = f"{path}.{add_field}[{i}]"
        for f, _ in opt.ListFields():
            if f.name not in _OPTION_FIELDS:
                note(f"{apath}.{f.name}", "accepted but not enforced by kmesh")
        h = opt.header
        value = h.raw_value.decode("latin-1") if h.raw_value else h.value
        if not _modifiable(h.key):
            problem(f"{apath}.header.key", f"'{h.key}': pseudo-headers and Host may not be modified (as in Envoy)")
            continue
        if opt.HasField("append") and opt.append_action != APPEND_IF_EXISTS_OR_ADD:
            problem(f"{apath}.append", "both append and append_action are set, which Envoy refuses")
            continue
        action = opt.append_action
        if opt.HasField("append") and not opt.append.value:
            action = OVERWRITE_IF_EXISTS_OR_ADD
        parts, why = _parts(value)
        if parts is None:
            note(f"{apath}.header.value", why)
            continue
        out.append(_Add(h.key.lower(), parts, action, opt.keep_empty_value))
    drop = set()
    for i, name in enumerate(removes):
        if not _modifiable(name):
            problem(f"{path}.{remove_field}[{i}]", f"'{name}': pseudo-headers and Host may not be removed (as in Envoy)")
        drop.add(name.lower())
    if not out and not drop:
        return None
    return HeaderOps(frozenset(drop), tuple(out))
