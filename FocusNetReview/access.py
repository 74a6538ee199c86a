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
