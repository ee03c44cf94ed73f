"""The benchmarks' HTTP client: HTTP/1.1 with keep-alive, `h11` for the protocol over asyncio
streams, one connection per concurrent caller.

The load generator shares the machine's cores with the engine it measures, so its own cost
lands in every figure. httpx costs about 1.9 ms of CPU per request (measured: 2,000 posts of a
2 KB body, 16 at a time, against a server that answers at once), this client about 0.1 ms: on
two cores, the difference is CPU taken from the engine under test.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

READ_SIZE = 65536


@dataclass(frozen=True)
class Answer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @property
    def reusable(self) -> bool:
        """Not closed by the server since its last answer (uvicorn closes idle ones after 5 s)."""
        return not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class LoadClient:
    """`post` against one server, with `headers` on every request; use as
    `async with LoadClient(url) as http`, or call `aclose`."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None,
                 timeout_s: float = 60.0) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"an http:// URL is needed, not {base_url!r}")
        self.host, self.port, self.timeout_s = url.hostname, url.port or 80, timeout_s
        self.headers = headers or {}
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def post(self, path: str, *, content: bytes = b"", json: Any = None,
                   headers: dict[str, str] | None = None) -> Answer:
        """`json`, when given, is the body, sent as `application/json`."""
        fields = {**self.headers, **(headers or {})}
        if json is not None:
            content = jsonlib.dumps(json).encode()
            fields.setdefault("Content-Type", "application/json")
        return await self.request("POST", path, content, fields)

    async def request(self, method: str, path: str, content: bytes,
                      headers: dict[str, str]) -> Answer:
        async with asyncio.timeout(self.timeout_s):
            conn = await self._checkout()
            answer = await self._exchange(conn, method, path, content, headers)
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:  # the server asked to close (`Connection: close`)
            conn.close()
        return answer

    async def _checkout(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn
            conn.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, method: str, path: str, content: bytes,
                        headers: dict[str, str]) -> Answer:
        fields = [("Host", f"{self.host}:{self.port}"), ("Content-Length", str(len(content))),
                  *headers.items()]
        try:
            conn.writer.write(
                conn.h11.send(h11.Request(method=method, target=path, headers=fields))
                + conn.h11.send(h11.Data(data=content)) + conn.h11.send(h11.EndOfMessage()))
            await conn.writer.drain()
            status, body = 0, bytearray()
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    conn.h11.receive_data(await conn.reader.read(READ_SIZE))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return Answer(status, bytes(body))
        except BaseException:  # h11 raises RemoteProtocolError when the server hangs up mid-answer
            conn.close()
            raise
