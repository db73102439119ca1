"""Checks every HTTP request passes before any route sees it (an ASGI middleware).

A local server without an API key is still reachable from any web page the user opens: the page
can POST with `Content-Type: text/plain` (a "simple" request, sent without a CORS preflight), and a
DNS-rebinding site reaches 127.0.0.1 under its own host name. So: only the allowed Host names
(the loopback names by default), POSTs only as application/json (which needs a preflight this
server never grants), and with an API key the API's description needs the key too.
"""

from __future__ import annotations

import hmac
import json
import re

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
# the one method a page may send cross-site without a preflight (PUT, PATCH and DELETE are
# preflighted, and this server grants no CORS preflight): a raw-bytes PUT upload stays possible
JSON_ONLY_METHODS = {"POST"}
KEYED_DOC_PATHS = ("/openapi.json", "/docs", "/redoc")


# a Host header is a name or [IPv6 address], then at most ":port"; anything else matches no allowed name
HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]]*))(?::[0-9]{1,5})?")


def host_name(host_header: str) -> str:
    """The Host header without its port ("[::1]:8080" -> "::1"); "[::1]evil.com" and
    "localhost:evil.com" are no host name of ours: they come back whole."""
    host = host_header.strip().lower()
    if host.count(":") > 1 and not host.startswith("["):
        return host  # a bare IPv6 address ("::1"), as the allowed list spells it
    match = HOST_HEADER.fullmatch(host)
    if match is None:
        return host
    return match.group("ipv6") or match.group("name")


def api_key_matches(authorization: str, api_key: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class RequestGuard:
    """Refuses (before routing) bad Host names, non-JSON bodies, and unkeyed requests for the API docs."""

    def __init__(self, app, allowed_hosts, api_key: str | None):
        self.app = app
        self.allowed_hosts = {host_name(h) for h in allowed_hosts}
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, extra = refusal
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": status}})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": body.encode()})

    def refusal(self, scope, headers: dict[str, str]):
        host = host_name(headers.get("host", ""))
        if ANY_HOST not in self.allowed_hosts and host not in self.allowed_hosts:
            message = (f"Host {host!r} is not allowed (a DNS-rebinding guard): start the server with "
                       f"--allowed-hosts {host or 'NAME'} to accept it")
            return 400, message, []
        if scope["method"] in JSON_ONLY_METHODS and not is_json(headers.get("content-type", "")):
            return 415, "POST requests must be sent as 'Content-Type: application/json' (even without a body)", []
        keyed = self.api_key is not None and scope["path"].startswith(KEYED_DOC_PATHS)
        if keyed and not api_key_matches(headers.get("authorization", ""), self.api_key):
            return (401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    [(b"www-authenticate", b"Bearer")])
        return None


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"
