"""How a request is seen and matched, for route tables and RBAC alike (pure
functions): the request as Envoy's matchers see it (``View``: Host
lowercased, the path without query and fragment, headers by lowercase name,
a repeated header as its values), path specifiers, header / query / gRPC
conditions, string matchers, RE2 regexes with Envoy's program-size limit,
and the problem/note reporting every compile step shares.
"""
from __future__ import annotations

import operator
import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf import duration_pb2
from google.protobuf.message import Message
import re2

from kmesh.config.fields import NOT_ENFORCED

Report = Callable[[str, str], None]
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# absl::SimpleAtoi: optional ASCII white space around an optionally signed decimal.
_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}
_EMPTY: Mapping[str, str] = MappingProxyType({})
_GRPC = "application/grpc"
_INT64 = (-2**63, 2**63)


@dataclass(frozen=True, slots=True)
class Request:
    """One request as received. ``path`` is the request target in origin
    form (with the query); ``host`` the authority: the Host header, or the
    URL's of an absolute-form target, or every Host sent joined by ','
    (Envoy's :authority); header names are as sent. ``normalised``: the
    head as sent says otherwise (the head sent upstream must say this)."""
    method: str
    path: str
    host: str
    headers: tuple[tuple[str, str], ...] = ()
    normalised: bool = False


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

class Sink:
    """The caller's problem/note callbacks, remembering whether a problem came."""
    __slots__ = ("_problem", "failed", "note")

    def __init__(self, problem: Report, note: Report):
        self._problem, self.note, self.failed = problem, note, False

    def problem(self, path: str, reason: str) -> None:
        self.failed = True
        self._problem(path, reason)


def check_fields(sink: Sink, path: str, msg: Message, handled: Iterable[str],
                  problems: Mapping[str, str] = _EMPTY, notes: Mapping[str, str] = _EMPTY,
                  strict: bool = False) -> None:
    """Report each set field of ``msg`` that the caller does not apply itself:
    a problem if listed in ``problems``, else a note. ``strict``: a field known
    to no list (a newer proto) is a problem, for messages whose every field
    changes which requests match."""
    for f, _ in msg.ListFields():
        name = f.name
        if name in handled:
            continue
        if name in problems:
            sink.problem(f"{path}.{name}", problems[name])
        elif strict and name not in notes:
            sink.problem(f"{path}.{name}", "not supported by kmesh")
        else:
            sink.note(f"{path}.{name}", notes.get(name, NOT_ENFORCED))


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def lower(text: str) -> str:
    """ASCII lowercase, as Envoy's (absl) case-insensitive compares."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def query_start(path: str) -> int:
    """Where the query or fragment starts (Envoy's removeQueryAndFragment)."""
    ends = [i for i in (path.find("?"), path.find("#")) if i >= 0]
    return min(ends) if ends else len(path)


def duration_ms(sink: Sink, path: str, d: duration_pb2.Duration) -> int | None:
    if d.seconds < 0 or d.nanos < 0 or d.nanos > 999_999_999:
        sink.problem(path, "must be a non-negative duration")
        return None
    return d.seconds * 1000 + d.nanos // 1_000_000


def percent(sink: Sink, path: str, fp) -> float:
    """A FractionalPercent as 0..100 (a numerator over the denominator is 100 %)."""
    denominator = _DENOMINATORS.get(fp.denominator)
    if denominator is None:
        sink.problem(f"{path}.denominator", f"unknown denominator {fp.denominator}")
        return 0.0
    return min(fp.numerator / denominator, 1.0) * 100




# --------------------------------------------------------------------------
# Regular expressions: RE2 itself (google-re2), as in Envoy. Linear time: no
# pattern a control plane sends can stall the hand-off (Python's re
# backtracks: "(a+)+$" against a long header would).
# --------------------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False   # the error comes back as re2.error; nothing on stderr
# Envoy refuses a bigger program (the re2.max_program_size.error_level
# runtime key, 100 by default): the same patterns load in both.
RE2_MAX_PROGRAM_SIZE = 100


def _compile_re2(pattern: str) -> tuple[re2._Regexp | None, str]:
    """``pattern`` compiled, or None and why RE2 (so Envoy) refuses it."""
    try:
        rx = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        return None, f"not RE2 syntax: {why}"
    if rx.programsize > RE2_MAX_PROGRAM_SIZE:
        return None, (f"RE2 program size of {rx.programsize} > max program size of {RE2_MAX_PROGRAM_SIZE} "
                      "(Envoy's re2.max_program_size.error_level): simplify the pattern")
    return rx, ""


def regex(sink: Sink, path: str, rm) -> re2._Regexp | None:
    """A RegexMatcher, compiled; matched in full, as RE2::FullMatch."""
    check_fields(sink, path, rm, ("regex", "google_re2"))
    if rm.google_re2.HasField("max_program_size"):
        sink.note(f"{path}.google_re2.max_program_size", f"deprecated: {NOT_ENFORCED}")
    if not rm.regex:
        sink.problem(f"{path}.regex", "must not be empty")
        return None
    rx, why = _compile_re2(rm.regex)
    if rx is None:
        sink.problem(f"{path}.regex", why)
    return rx


def substitution(text: str, groups: int) -> tuple[tuple[str | int, ...] | None, str]:
    """An RE2 rewrite string as literal parts and group numbers: ``\\0``..``\\9``
    name groups, ``\\\\`` is a backslash, any other escape is invalid."""
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            literal.append(c)
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt == "\\":
            literal.append("\\")
        elif nxt and nxt in string.digits:
            if int(nxt) > groups:
                return None, f"\\{nxt} names a group the pattern does not have"
            parts += ["".join(literal), int(nxt)]
            literal = []
        else:
            return None, f"invalid escape '\\{nxt}' (RE2 allows \\0 to \\9 and \\\\)"
        i += 2
    parts.append("".join(literal))
    return tuple(p for p in parts if p != ""), ""


def replace_all(rx: re2._Regexp, parts: tuple[str | int, ...], text: str) -> str:
    """RE2::GlobalReplace: like re.sub, but an empty match right where the
    previous match ended is not replaced."""
    out, pos, last_end = [], 0, -1
    for m in rx.finditer(text):
        start, end = m.span()
        if start == end == last_end:
            continue
        out.append(text[pos:start])
        out.extend(p if isinstance(p, str) else (m.group(p) or "") for p in parts)
        pos = last_end = end
    out.append(text[pos:])
    return "".join(out)


# --------------------------------------------------------------------------
# The request as matchers see it
# --------------------------------------------------------------------------

class View:
    """One request's derived forms, each computed on first use."""
    __slots__ = ("_headers", "_values", "_query", "path", "req")

    def __init__(self, req: Request, ignore_path_parameters: bool):
        self.req = req
        path = req.path[:query_start(req.path)]
        if ignore_path_parameters:
            path = path.split(";", 1)[0]
        self.path = path        # what path specifiers match
        self._headers: dict[str, str] | None = None
        self._values: dict[str, tuple[str, ...]] | None = None
        self._query: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Lowercased names -> values, repeated headers joined with ',' (as
        Envoy's getAllOfHeaderAsString), plus the pseudo-headers. ``host`` is
        an alias of ``:authority``, as in Envoy's header map."""
        if self._headers is None:
            req, out = self.req, {}
            for name, value in req.headers:
                key, value = lower(name), value.strip(" \t")
                if key != "host":
                    prev = out.get(key)
                    out[key] = value if prev is None else f"{prev},{value}"
            out.setdefault("x-forwarded-proto", "http")
            out.update({":authority": req.host, "host": req.host, ":path": req.path,
                        ":method": req.method, ":scheme": "http"})
            self._headers = out
        return self._headers

    @property
    def header_values(self) -> dict[str, tuple[str, ...]]:
        """Lowercased names -> each value as sent: a header matcher matches
        when any one of a repeated header's values does (Envoy 1.40: `x: foo`
        and `x: bar` match `exact: foo`, not `exact: "foo,bar"`)."""
        if self._values is None:
            out: dict[str, tuple[str, ...]] = {}
            for name, value in self.req.headers:
                key = lower(name)
                if key != "host":
                    out[key] = out.get(key, ()) + (value.strip(" \t"),)
            self._values = {**{k: (v,) for k, v in self.headers.items()}, **out}
        return self._values

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, not percent-decoded, the first of a repeated name
        winning (Envoy's parseQueryString)."""
        if self._query is None:
            out: dict[str, str] = {}
            path = self.req.path
            q = path.find("?")
            if q >= 0:
                for param in path[q + 1:].split("&"):
                    name, _, value = param.partition("=")
                    out.setdefault(name, value)
            self._query = out
        return self._query


# --------------------------------------------------------------------------
# Path specifiers
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prefix:
    prefix: str             # lowercased when ignore_case
    ignore_case: bool

    def matches(self, path: str) -> bool:
        if self.ignore_case:
            return lower(path[:len(self.prefix)]) == self.prefix
        return path.startswith(self.prefix)

    def matched_len(self, target: str) -> int:
        return len(self.prefix)


@dataclass(frozen=True, slots=True)
class Exact:
    path: str
    ignore_case: bool

    def matches(self, path: str) -> bool:
        return (lower(path) if self.ignore_case else path) == self.path

    def matched_len(self, target: str) -> int:
        return len(self.path)


@dataclass(frozen=True, slots=True)
class SeparatedPrefix:
    """A prefix followed by '/' or the end of the path (the query is gone)."""
    prefix: Prefix

    def matches(self, path: str) -> bool:
        n = len(self.prefix.prefix)
        return self.prefix.matches(path) and (len(path) == n or path[n:n + 1] == "/")

    def matched_len(self, target: str) -> int:
        return len(self.prefix.prefix)


@dataclass(frozen=True, slots=True)
class _Regex:
    rx: re2._Regexp

    def matches(self, path: str) -> bool:
        return self.rx.fullmatch(path) is not None

    def matched_len(self, target: str) -> int:
        return query_start(target)       # a rewrite replaces the whole path


PathMatch = Prefix | Exact | SeparatedPrefix | _Regex
_SEPARATED_PREFIX = re.compile(r"[^?#]+[^?#/]")

MATCH_APPLIED = ("prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive", "headers",
                  "query_parameters", "grpc")
MATCH_PROBLEMS = {
    "connect_matcher": "CONNECT requests are not routed by kmesh",
    "path_match_policy": "path match extensions (URI templates) are not supported by kmesh",
    "runtime_fraction": "runtime-fraction matching is not supported by kmesh",
    "tls_context": "kmesh routes plaintext HTTP only: TLS context matching is not supported",
    "dynamic_metadata": "dynamic metadata is not available to kmesh's router",
    "filter_state": "filter state is not available to kmesh's router",
}


def path_match(sink: Sink, path: str, m) -> PathMatch | None:
    kind = m.WhichOneof("path_specifier")
    ignore_case = m.HasField("case_sensitive") and not m.case_sensitive.value
    if kind == "prefix":
        return Prefix(lower(m.prefix) if ignore_case else m.prefix, ignore_case)
    if kind == "path":
        return Exact(lower(m.path) if ignore_case else m.path, ignore_case)
    if kind == "path_separated_prefix":
        value = m.path_separated_prefix
        if not _SEPARATED_PREFIX.fullmatch(value):
            sink.problem(f"{path}.path_separated_prefix",
                         "must be at least 2 characters, without '?' or '#', and must not end with '/'")
            return None
        return SeparatedPrefix(Prefix(lower(value) if ignore_case else value, ignore_case))
    if kind == "safe_regex":
        if m.HasField("case_sensitive"):
            sink.note(f"{path}.case_sensitive", "has no effect on safe_regex (as in Envoy)")
        rx = regex(sink, f"{path}.safe_regex", m.safe_regex)
        return _Regex(rx) if rx else None
    if kind is None:
        sink.problem(path, "a route match needs prefix, path, safe_regex or path_separated_prefix")
    return None     # connect_matcher, path_match_policy: reported with the other fields


# --------------------------------------------------------------------------
# Header, query parameter and gRPC conditions
# --------------------------------------------------------------------------

_TEXT_OPS = {"exact": operator.eq, "prefix": str.startswith, "suffix": str.endswith, "contains": operator.contains}


@dataclass(frozen=True, slots=True)
class TextTest:
    """exact / prefix / suffix / contains ``value`` (lowercased with
    ``ignore_case``): a test the native engine can run too (l7route.c)."""
    kind: str
    value: str
    ignore_case: bool
    _op: Callable[[str, str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_op", _TEXT_OPS[self.kind])   # looked up once, not per request

    def __call__(self, v: str) -> bool:
        return self._op(lower(v) if self.ignore_case else v, self.value)


def any_value(v: str) -> bool:
    """Envoy's legacy exact_match with an empty value: any value matches."""
    return True


def _text_test(kind: str, value: str, ignore_case: bool) -> Callable[[str], bool]:
    return TextTest(kind, lower(value) if ignore_case else value, ignore_case)


def _regex_test(rx: re2._Regexp) -> Callable[[str], bool]:
    return lambda v: rx.fullmatch(v) is not None


def _range_test(start: int, end: int) -> Callable[[str], bool]:
    """Int64Range [start, end) over a value that parses as an int64."""
    def test(v: str) -> bool:
        m = _ATOI.fullmatch(v)
        if m is None:
            return False
        n = int(m.group(1))
        return _INT64[0] <= n < _INT64[1] and start <= n < end
    return test


def string_matcher(sink: Sink, path: str, sm) -> Callable[[str], bool] | None:
    """An envoy.type.matcher.v3.StringMatcher as a test of a value."""
    check_fields(sink, path, sm, ("exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"),
                  {"custom": "custom string matcher extensions are not supported by kmesh"}, strict=True)
    kind = sm.WhichOneof("match_pattern")
    if kind == "safe_regex":
        if sm.ignore_case:
            sink.problem(f"{path}.ignore_case", "ignore_case has no effect for safe_regex (Envoy refuses it)")
        rx = regex(sink, f"{path}.safe_regex", sm.safe_regex)
        return _regex_test(rx) if rx else None
    if kind in _TEXT_OPS:
        value = getattr(sm, kind)
        if kind != "exact" and not value:
            sink.problem(f"{path}.{kind}", "must not be empty")
            return None
        return _text_test(kind, value, sm.ignore_case)
    if kind is None:
        sink.problem(path, "a string matcher needs exact, prefix, suffix, contains or safe_regex")
    return None


@dataclass(frozen=True, slots=True)
class HeaderCond:
    """One HeaderMatcher. ``test`` None is a presence match (``present``)."""
    name: str
    test: Callable[[str], bool] | None
    present: bool
    invert: bool
    missing_as_empty: bool

    def __call__(self, view: View) -> bool:
        values = view.header_values.get(self.name)
        if values is None:
            if not self.missing_as_empty:
                # An absent header fails every matcher but a presence match.
                return self.test is None and self.present == self.invert
            values = ("",)
        test = self.test
        matched = self.present if test is None else any(test(v) for v in values)
        return matched != self.invert


_LEGACY_TEXT = {"prefix_match": "prefix", "suffix_match": "suffix", "contains_match": "contains"}


def _header_test(sink: Sink, path: str, kind: str, value) -> Callable[[str], bool] | None:
    if kind == "exact_match":
        # Envoy's legacy exact_match: an empty value matches any value.
        return any_value if not value else _text_test("exact", value, False)
    if kind in _LEGACY_TEXT:
        if not value:
            sink.problem(path, "must not be empty")
            return None
        return _text_test(_LEGACY_TEXT[kind], value, False)
    if kind == "safe_regex_match":
        rx = regex(sink, path, value)
        return _regex_test(rx) if rx else None
    if kind == "range_match":
        return _range_test(value.start, value.end)
    return string_matcher(sink, path, value)       # string_match


def header_cond(sink: Sink, path: str, h) -> HeaderCond | None:
    check_fields(sink, path, h, ("name", "exact_match", "safe_regex_match", "range_match", "present_match",
                                  "prefix_match", "suffix_match", "contains_match", "string_match",
                                  "invert_match", "treat_missing_header_as_empty"), strict=True)
    if not h.name:
        sink.problem(f"{path}.name", "a header matcher needs a name")
        return None
    kind = h.WhichOneof("header_match_specifier")
    test, present = None, True      # no specifier: the header must be present
    if kind == "present_match":
        present = h.present_match
    elif kind is not None:
        test = _header_test(sink, f"{path}.{kind}", kind, getattr(h, kind))
        if test is None:
            return None
    return HeaderCond(lower(h.name), test, present, h.invert_match, h.treat_missing_header_as_empty)


@dataclass(frozen=True, slots=True)
class _QueryCond:
    """One QueryParameterMatcher; ``test`` None: the parameter must be present
    (Envoy reads ``present_match: false`` the same way)."""
    name: str
    test: Callable[[str], bool] | None

    def __call__(self, view: View) -> bool:
        value = view.query.get(self.name)
        return value is not None and (self.test is None or self.test(value))


def _query_cond(sink: Sink, path: str, q) -> _QueryCond | None:
    check_fields(sink, path, q, ("name", "string_match", "present_match"), strict=True)
    if not q.name:
        sink.problem(f"{path}.name", "a query parameter matcher needs a name")
        return None
    if q.WhichOneof("query_parameter_match_specifier") != "string_match":
        return _QueryCond(q.name, None)
    test = string_matcher(sink, f"{path}.string_match", q.string_match)
    return _QueryCond(q.name, test) if test else None


def _is_grpc(view: View) -> bool:
    """Envoy's isGrpcRequestHeaders: content-type application/grpc or application/grpc+..."""
    ct = view.headers.get("content-type", "")
    return ct.startswith(_GRPC) and (len(ct) == len(_GRPC) or ct[len(_GRPC)] == "+")


def conditions(sink: Sink, path: str, m) -> tuple[Callable[[View], bool], ...]:
    """The non-path conditions of a RouteMatch, in Envoy's order."""
    conds: list = [_is_grpc] if m.HasField("grpc") else []
    conds += [header_cond(sink, f"{path}.headers[{i}]", h) for i, h in enumerate(m.headers)]
    conds += [_query_cond(sink, f"{path}.query_parameters[{i}]", q) for i, q in enumerate(m.query_parameters)]
    return tuple(c for c in conds if c is not None)
