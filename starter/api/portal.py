"""`GET /portal`: the customer page (SPEC §5.10), with its script and style sheet.

The page is static apart from the pack list, which is embedded server-side as a JSON data block
(the packs are configuration, not organization data: no extra API read for a customer token).
It reads the customer token from the URL fragment, which browsers never send to a server, and
calls the `/v1` API of this origin with it. Nothing is loaded from anywhere else; the CSP says
so, and says which sites may frame the page (`[portal] frame_ancestors`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Response

from billing.config import BillingConfig
from starter.api.deps import RuntimeDep

STATIC = Path(__file__).resolve().parent.parent / "portal"
PACKS_MARKER = "<!-- packs -->"

router = APIRouter(tags=["customer page"])


@cache
def _asset(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def content_security_policy(config: BillingConfig) -> str:
    """Only this origin, and framed only by the configured sites (none when the list is
    empty)."""
    ancestors = " ".join(config.portal.frame_ancestors) or "'none'"
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; "
            f"frame-ancestors {ancestors}")


def _headers(config: BillingConfig) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(config),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def packs_block(config: BillingConfig) -> str:
    """The packs for sale as a `<script type="application/json">` block (escaped so that no
    value can close the element)."""
    packs = [{"id": p.id, "units": p.units, "price_cents": p.price_cents,
              "currency": p.currency, "expiry_days": p.expiry_days} for p in config.packs]
    text = json.dumps(packs).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")
    return f'<script type="application/json" id="packs">{text}</script>'


@router.get("/portal", response_class=Response, summary="The customer page",
            responses={200: {"content": {"text/html": {}},
                             "description": "open it as `/portal#token=<customer token>`"}})
async def portal(runtime: RuntimeDep) -> Response:
    """One self-contained page: the week's usage against the plan, the extras balance, every
    credit lot and its expiry, units on hold, recent activity and, with a `purchase` token,
    packs to buy and the Stripe billing portal. The token comes from the URL fragment."""
    html = _asset("portal.html").replace(PACKS_MARKER, packs_block(runtime.config))
    return Response(html, media_type="text/html", headers=_headers(runtime.config))


@router.get("/portal/portal.js", response_class=Response, include_in_schema=False)
async def script(runtime: RuntimeDep) -> Response:
    return Response(_asset("portal.js"), media_type="text/javascript",
                    headers=_headers(runtime.config))


@router.get("/portal/portal.css", response_class=Response, include_in_schema=False)
async def style(runtime: RuntimeDep) -> Response:
    return Response(_asset("portal.css"), media_type="text/css", headers=_headers(runtime.config))
