"""Who may ask: a request's Host header must name this server, and with an access token every /api request
must carry it.

The Host check defeats DNS rebinding: a page on evil.example that rebinds its name to 127.0.0.1 reaches the
server with ``Host: evil.example`` and is refused (421), so it can never read the photos. Accepted are the
address the request arrived on (the ASGI ``server`` of the connection), the loopback names localhost,
127.0.0.1 and [::1] when it arrived on loopback, and the names given as ``allowed_hosts``; the port is
ignored.

With a token, /api requests need ``Authorization: Bearer TOKEN`` or the cookie that opening
``/?token=TOKEN`` sets (HttpOnly, SameSite=Strict; the page then works as before, the token leaves the
address bar by a redirect). Tokens are compared in constant time. The page, its files and the API's
documentation are served without a token: they hold nothing of the collection.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lookalike.serve.errors import error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
COOKIE_PREFIX = "lookalike-token-"


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without the port, IPv6 brackets or a final dot."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def connection_names(server: Iterable[object] | None) -> frozenset[str]:
    """The Host names that name the address a request arrived on: the address itself, and the loopback
    names when it is a loopback address (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
    if not server:
        return frozenset()
    address = host_name(str(next(iter(server))))
    names = {address}
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return frozenset(names)
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        names.add(str(mapped))
        ip = mapped
    if ip.is_loopback:
        names |= LOOPBACK_NAMES
    return frozenset(names)


def same_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def bearer(headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def cookie_name(scope: Scope) -> str:
    """One cookie per port: two servers on one machine do not overwrite each other's token."""
    server = scope.get("server")
    port = server[1] if server and len(server) > 1 and server[1] else "default"
    return f"{COOKIE_PREFIX}{port}"


class Access:
    """ASGI middleware: refuse a request naming another host (421) and, with ``token``, an /api request
    without it (401); open ``/?token=TOKEN`` to set the cookie the page then sends."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = (), token: str | None = None) -> None:
        self.app = app
        self.allowed_hosts = frozenset(host_name(name) for name in allowed_hosts)
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = host_name(headers.get("host", ""))
        if not host or host not in self.allowed_hosts | connection_names(scope.get("server")):
            detail = (
                f"this server does not answer to the host name {host or '(none)'!r}; start it with "
                "--allowed-host NAME to accept that name"
            )
            await error_response(421, "unknown host", detail)(scope, receive, send)
            return
        if self.token is not None:
            answer = self._token_answer(scope, headers)
            if answer is not None:
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _token_answer(self, scope: Scope, headers: Headers) -> Response | None:
        """The answer to a request the token decides (refused, or the cookie set); None to go on."""
        assert self.token is not None
        root = scope.get("root_path", "")
        path = scope["path"][len(root) :] if scope["path"].startswith(root) else scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")) if path == "/" else {}
        if "token" in query:
            if not same_token(query["token"][0], self.token):
                return _unauthorized("the token in the address is not this server's")
            page = Response(status_code=303, headers={"Location": f"{root}/", "Cache-Control": "no-store"})
            page.set_cookie(cookie_name(scope), self.token, path=f"{root}/", httponly=True, samesite="strict")
            return page
        if path != "/api" and not path.startswith("/api/"):
            return None
        cookie = cookie_parser(headers.get("cookie", "")).get(cookie_name(scope))
        if same_token(bearer(headers), self.token) or same_token(cookie, self.token):
            return None
        return _unauthorized(
            "this server needs its access token: open /?token=TOKEN once, or send the header "
            "'Authorization: Bearer TOKEN'"
        )


def _unauthorized(detail: str) -> Response:
    return error_response(401, "access token needed", detail, {"WWW-Authenticate": "Bearer"})
