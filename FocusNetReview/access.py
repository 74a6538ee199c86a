"""Who may open the review station.

On the loopback interface (the default) only this computer's users reach the
server. Bound to any other address, every request must carry the random
access token printed at start: in the URL (``?token=...``) once, after which
the browser holds it in a same-site, HTTP-only cookie for the page's own
requests and its WebSocket.
"""
from __future__ import annotations

import hmac
import secrets
from typing import Optional

from FocusNetCore.node import is_loopback  # noqa: F401  (one definition, used here and by the node)

COOKIE = "focusnet_review_token"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_middleware(token: str):
    """An aiohttp middleware refusing requests without ``token``."""
    from aiohttp import web

    @web.middleware
    async def check(request, handler):
        given: Optional[str] = request.query.get("token") or request.cookies.get(COOKIE)
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return web.Response(status=403, text="FocusNet review: this server needs the access token printed when "
                                                 "it started (open the full URL, ending in ?token=...).\n")
        response = await handler(request)
        if request.query.get("token") and hasattr(response, "set_cookie"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    return check


# The page's own name for the per-run wslink secret (trame's client reads
# ``secret`` from the page's URL and removes it from the address bar).
SECRET_PARAM = "secret"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1'; '[::1]:8080' -> '[::1]'."""
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def page_guard_middleware(secret: str, loopback: bool):
    """An aiohttp middleware that keeps other web pages out of the review:

    - the WebSocket (the only way to drive a review) is refused unless its
      ``Origin`` is the page's own (a script on another site always sends its
      own origin; browsers do not let it lie);
    - on loopback, a request whose ``Host`` is not a loopback name is refused
      (DNS rebinding: another site's name resolved to 127.0.0.1);
    - the page is served with the per-run wslink ``secret`` in its URL (added
      by a redirect, again after a reload: trame's client reads it from there
      and takes it out of the address bar),
      which only a page of this origin can read; a WebSocket that does not
      say it is not authenticated (wslink's default secret does not work).
    """
    from urllib.parse import urlsplit

    from aiohttp import web

    @web.middleware
    async def guard(request, handler):
        host = request.headers.get("Host", "")
        if loopback and _host_name(host) not in LOOPBACK_HOSTS:
            return web.Response(status=403, text=f"FocusNet review: refused Host {host!r}; open the URL printed at "
                                                 "start (127.0.0.1 or localhost).\n")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            origin = request.headers.get("Origin", "")
            if not origin or urlsplit(origin).netloc.lower() != host.lower():
                print(f"FocusNet review: refused a WebSocket from origin {origin or '(none)'}", flush=True)
                return web.Response(status=403, text="FocusNet review: refused a connection from another web site.\n")
        elif request.path in ("/", "/index.html") and request.query.get(SECRET_PARAM) != secret:
            query = dict(request.query)
            query[SECRET_PARAM] = secret
            raise web.HTTPFound(request.rel_url.with_path("/index.html").with_query(query))
        return await handler(request)

    return guard
