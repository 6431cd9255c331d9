"""The fuzz suite's requests on raw sockets (tests/streaming/gateway/test_fuzz.py): hypothesis strategies for headers,
request lines and body framing no HTTP client would send, a reader of whatever comes back, and its oracle.
"""

import re
import socket
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from hypothesis import strategies as st

from tests.support.fuzz_bodies import BODIES, JSON_PREFIXES, assert_openai_error


# Raw HTTP/1.1 exchanges -----------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict  # lower-case names; a repeated header's last value
    body: bytes
    head: bytes = field(repr=False, default=b"")

    @property
    def content_type(self):
        return self.headers.get("content-type", "")


def exchange(port: int, data: bytes, *, half_close=False, head=False, timeout=15.0) -> list[RawResponse]:
    """Send `data` as it is, then read every response until the server closes the connection.

    `half_close` ends the request stream (a truncated body); otherwise the request must say `Connection: close`.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking it all: its answer is still to be read
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return parse_responses(received, head=head)


def parse_responses(data: bytes, head=False) -> list[RawResponse]:
    responses = []
    while data:
        response_head, separator, rest = data.partition(b"\r\n\r\n")
        assert separator, ("a response head that does not end", data[:500])
        lines = response_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head:  # the answer to HEAD is its head: anything after it but another answer is a body it must not have
            body, data = (b"", rest) if not rest or rest.startswith(b"HTTP/") else (rest, b"")
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, data = rest[:length], rest[length:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, data = _dechunk(rest)
        else:
            body, data = (b"", rest) if 100 <= status < 200 or status in (204, 304) else (rest, b"")
        if not 100 <= status < 200:  # an interim 100 Continue is not the answer
            responses.append(RawResponse(status, headers, body, response_head))
    return responses


def _dechunk(data: bytes):
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if not size:
            _, _, data = data.partition(b"\r\n")  # no trailers from these servers
            return body, data
        body, data = body + data[:size], data[size + 2:]


# Requests on raw sockets: headers and framing ---------------------------------------------------------------------

PATHS = ["/v1/chat/completions", "/v1/models", "/v1/quota", "/v1/nothing", "/api/chat", "/api/quota", "/api/nothing",
         "/healthz", "/readyz", "/openapi.json"]
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]
CHAT = b'{"model": "sim-small", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}'
TOKEN = st.text("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1,
                max_size=12).map(str.encode)
# Any byte but CR and LF (which would end the header): NUL, controls, and bytes that are not ASCII.
HEADER_BYTES = st.binary(max_size=40).filter(lambda value: b"\r" not in value and b"\n" not in value)


def header_values(key: bytes):
    """Values for the headers the gateway reads, plausible and not, by name."""
    return {
        b"Authorization": st.one_of(st.sampled_from([
            b"Bearer " + key, b"bearer " + key, b"BEARER   " + key + b"   ", b"Bearer", b"Bearer ", b"Basic " + key,
            key, b"Bearer " + key + b"x", b"Bearer " + key[:-1], b"Bearer sk-sluice-", b"Bearer " + b"A" * 8000,
            b"Bearer \xff\xfe", b"Bearer " + key + b"\x00", b"Bearer " + key + b", Bearer " + key,
        ]), HEADER_BYTES),
        b"Content-Type": st.one_of(st.sampled_from([
            b"application/json", b"APPLICATION/JSON", b"application/json; charset=utf-8",
            b"application/json; charset=latin-1", b"application/json;;;", b"application/json; =", b"text/plain",
            b"multipart/form-data", b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b"",
            b"application/json\xff", b"*/*", b"application/jsonx", b"application/json, text/plain",
        ]), HEADER_BYTES),
        b"Host": st.sampled_from([b"127.0.0.1", b"localhost", b"evil.example", b"", b"\xff\xfe", b"127.0.0.1:99999",
                                  b"[::1", b"a b", b"127.0.0.1, evil.example"]),
        b"Cookie": st.one_of(st.sampled_from([b"sessionid=x; csrftoken=y", b"=;=;", b"sessionid=\xff"]),
                             HEADER_BYTES),
        b"X-CSRFToken": HEADER_BYTES,
        b"Expect": st.sampled_from([b"100-continue", b"200-ok", b""]),
        b"Accept": st.sampled_from([b"text/html", b"*/*", b"text/event-stream", b"application/xml", b"\xff"]),
        b"Accept-Encoding": st.sampled_from([b"gzip", b"br, zstd", b"identity;q=0", b"*;q=0"]),
        b"Origin": st.sampled_from([b"http://evil.example", b"null", b"\xff"]),
        b"X-Forwarded-For": st.sampled_from([b"1.2.3.4", b"\xff", b"::1, 10.0.0.1"]),
        b"Range": st.sampled_from([b"bytes=0-1", b"bytes=-1", b"lines=1"]),
    }


@st.composite
def header_requests(draw, key: bytes):
    """(method, path, request bytes, complete): a request to a real route with fuzzed headers and a body framed by a
    Content-Length that may disagree with it. Incomplete requests (a length longer than the body) are sent and then
    the client's side is closed, as a client that gave up would."""
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS))
    values = header_values(key)
    named = draw(st.lists(st.sampled_from(sorted(values)), max_size=6))
    headers = [(name, draw(values[name])) for name in named]
    headers += draw(st.lists(st.tuples(TOKEN, HEADER_BYTES), max_size=2))
    if not any(name == b"Host" for name, _ in headers):
        headers.append((b"Host", b"127.0.0.1"))
    if not any(name == b"Authorization" for name, _ in headers) and draw(st.booleans()):
        headers.append((b"Authorization", b"Bearer " + key))
    body = draw(st.one_of(st.just(CHAT), st.just(b""), BODIES))
    length = len(body) + draw(st.sampled_from([0, 0, 0, -1, -len(body), 1, 100]))
    length = max(length, 0)
    complete = length <= len(body)
    if body or method in (b"POST", b"PUT", b"PATCH"):
        headers.append((b"Content-Length", str(length).encode()))
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    request = method + b" " + path.encode() + b" HTTP/1.1\r\n" + lines + b"Connection: close\r\n\r\n" + body
    return method, path, request, complete


WEIRD_METHODS = st.one_of(st.sampled_from([b"FOO", b"get", b"Get", b"PROPFIND", b"M-SEARCH", b"BREW", b"CONNECT",
                                           b"PRI", b"G" * 300, b"G\x01T", b"G\xffT", b"", b"GET GET"]), TOKEN)
AUTHORITIES = st.sampled_from([b"127.0.0.1", b"localhost:1", b"evil.example", b"u:p@127.0.0.1", b"[::1]:80", b"",
                               b"127.0.0.1:", b"\xff", b"%41", b"a..b", b"[::1", b"[", b"]x", b"[abc]",
                               b"%EF%BC%83"])
SCHEMES = st.sampled_from([b"http", b"https", b"HTTP", b"ftp", b"ws", b"http:"])
PATH_SUFFIXES = st.sampled_from([b"", b"?", b"?x=%ff", b"?a=1&a=2", b"#frag", b";p=1", b"/", b"//", b"/.", b"/..",
                                 b"%00", b"%2f", b"%", b"%zz", b"\xff", b"\x00", b" x", b"\t"])


@st.composite
def request_targets(draw):
    """A request target: origin form (percent-encoded, dot segments, bytes that are not ASCII), absolute form, the
    asterisk, the authority form."""
    path = draw(st.sampled_from(PATHS + ["/", "//v1/models", "/v1", "/V1/models", "/%76%31/models", "/v1%2fmodels",
                                         "/v1/../api/quota", "/api/../v1/models", "/v1/./models", "/_sim/stats"]))
    target = path.encode() + draw(PATH_SUFFIXES)
    form = draw(st.sampled_from(["origin", "origin", "origin", "absolute", "asterisk", "authority", "relative"]))
    if form == "absolute":
        authority = draw(AUTHORITIES)
        target = draw(SCHEMES) + b"://" + authority + target
    elif form == "asterisk":
        target = b"*"
    elif form == "authority":
        target = draw(AUTHORITIES) + b":443"
    elif form == "relative":
        target = target.lstrip(b"/")
    return target


def chunked(body: bytes, cuts, *, upper=False, zeros=0, extension=b"", trailers=b"") -> bytes:
    """`body` in chunks cut at `cuts`, sizes in hex (upper case, leading zeros, an extension if asked)."""
    pieces, start = [], 0
    for cut in sorted(set(cuts)) + [len(body)]:
        if cut > start:
            pieces.append(body[start:cut])
            start = cut
    out = b""
    for piece in pieces:
        size = f"{len(piece):X}" if upper else f"{len(piece):x}"
        out += b"0" * zeros + size.encode() + extension + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n" + trailers + b"\r\n"


@st.composite
def framed_requests(draw, key: bytes):
    """(target, request bytes, complete): any request line, and a body framed every way HTTP/1.1 allows and some it
    does not. Incomplete ones (the body shorter than announced, no last chunk) end with the client's side closed."""
    method = draw(st.one_of(st.sampled_from(METHODS), WEIRD_METHODS))
    target = draw(request_targets())
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1",
                                                         b"HTTP/1.1 ", b"HTTP/11", b""]))
    headers = b"Host: 127.0.0.1\r\n"
    if draw(st.integers(0, 3)):
        headers += b"Authorization: Bearer " + key + b"\r\nContent-Type: application/json\r\n"
    body = draw(st.one_of(st.just(CHAT), st.just(CHAT), BODIES))
    framing = draw(st.sampled_from(["none", "length", "length", "short", "long", "chunked", "chunked", "bad chunk",
                                    "truncated chunks", "short chunk", "both", "te"]))
    complete = True
    if framing == "length":
        headers += b"Content-Length: %d\r\n" % len(body)
    elif framing == "short":  # the rest is read as the next request
        headers += b"Content-Length: %d\r\n" % draw(st.integers(0, max(0, len(body) - 1)))
    elif framing == "long":
        headers += b"Content-Length: %d\r\n" % (len(body) + draw(st.integers(1, 100)))
        complete = False
    elif framing in ("chunked", "bad chunk", "truncated chunks", "short chunk"):
        headers += b"Transfer-Encoding: chunked\r\n"
        encoded = chunked(body, draw(st.lists(st.integers(0, len(body)), max_size=4)), upper=draw(st.booleans()),
                          zeros=draw(st.integers(0, 3)), extension=draw(st.sampled_from([b"", b";a=b", b"; x"])),
                          trailers=draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"])))
        if framing == "bad chunk":
            size = draw(st.sampled_from([b"zz", b"-1", b"0x5", b" 5", b"", b"ffffffffffffffffffff"]))
            encoded = size + b"\r\n" + body + b"\r\n0\r\n\r\n"
            complete = size != b"ffffffffffffffffffff"  # a size that is a number: the parser waits for that much
        elif framing == "truncated chunks":
            encoded = encoded[:draw(st.integers(0, max(0, len(encoded) - 5)))]
            complete = False
        elif framing == "short chunk":  # the chunk holds less than its size says: the parser waits for the rest
            encoded = b"%x\r\n" % (len(body) + draw(st.integers(1, 50))) + body + b"\r\n0\r\n\r\n"
            complete = False
        body = encoded
    elif framing == "both":  # Transfer-Encoding and Content-Length at once: a smuggling attempt
        headers += b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(body)
        body = chunked(body, [])
    elif framing == "te":
        codings = [b"gzip, chunked", b"chunked, chunked", b"identity", b"", b"Chunked", b"xchunked"]
        headers += b"Transfer-Encoding: %s\r\nContent-Length: %d\r\n" % (draw(st.sampled_from(codings)), len(body))
    request_line = method + b" " + target + (b" " + version if version else b"")
    return target, request_line + b"\r\n" + headers + b"Connection: close\r\n\r\n" + body, complete


def routed_path(target: bytes) -> str:
    """The path a request target reaches, as config/asgi.py routes it: an http(s) URL with a host by its path (the
    absolute form), anything else as it is; percent-decoded."""
    text = target.decode("latin-1")
    if re.match(r"(?i)https?://[^/?#]", text):
        try:
            text = urlsplit(text).path or "/"
        except ValueError:  # not a URL after all (an unclosed IPv6 bracket): routed as it is
            pass
    return unquote(text.split("?", 1)[0])


def _visible_ascii(data: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in data)


def assert_raw_answers(method: bytes, target: bytes, responses, complete: bool, where=""):
    """A complete request is answered; no answer is a 5xx; the first, to a target under /v1/ or /api/, is OpenAI's
    error JSON when it refuses (later ones answer what followed a body shorter than announced)."""
    where = where or target[:200]
    if complete:
        assert responses, (where, "no answer")
    for response in responses:
        assert response.status < 500, (where, response.status, response.head[:300], response.body[:300])
        # RFC 9110 9.3.2: a body would be read as the start of the next answer. A request line Twisted cannot parse
        # (a target with bytes outside visible ASCII, a version other than HTTP/1.x) is not known to be HEAD: it is
        # answered as what it is, not HTTP (the server's "could not be parsed as HTTP/1.1" 400).
        if method.upper() == b"HEAD" and _visible_ascii(target) and b"could not be parsed as HTTP" not in response.body:
            assert not response.body, (where, "a body in the answer to HEAD", response.head[:300], response.body[:300])
    if not responses:
        return
    first = responses[0]
    under_json = routed_path(target).startswith(JSON_PREFIXES) or target.decode("latin-1").startswith(JSON_PREFIXES)
    if first.status >= 400 and under_json:
        if method.upper() == b"HEAD":
            assert first.content_type.split(";")[0] == "application/json", (where, first.head[:300])
        else:
            assert_openai_error(first.status, first.content_type, first.body, where)
