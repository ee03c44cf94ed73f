"""A webhook receiver on 127.0.0.1 for the outbound webhook tests: it verifies every request
with the Standard Webhooks library, records it, and answers what the test scripted (200 by
default)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from starter.embedded import free_port

#: Standard Webhooks secrets (whsec_<base64>): the current one and the one it replaced.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any]
    verified: bool

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    def __init__(self, secret: str = SECRET, port: int | None = None) -> None:
        self.webhook = Webhook(secret)
        self.port = port or free_port()
        self.received: list[Received] = []
        #: Statuses to answer first, in order; 200 after them.
        self.script: list[int] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            self.webhook.verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        self.received.append(Received(headers=headers, raw=raw, body=json.loads(raw),
                                      verified=verified))
        return web.Response(status=self.script.pop(0) if self.script else 200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def of(self, org_id: str) -> list[Received]:
        return [r for r in self.received if r.body.get("org_id") == org_id]
