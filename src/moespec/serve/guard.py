"""An ASGI middleware in front of the API: the API key and the request body limit, before anything is parsed.

- API key (`--api-key`, `MOESPEC_API_KEY`): every path but the open ones (the web page `/`, `/health`, `/metrics` by default) needs
  `Authorization: Bearer <key>`, OpenAI's header; compared in constant time; a missing or wrong key is a 401 with
  OpenAI's `invalid_api_key` error.
- Body size (`--max-body-bytes`): a declared Content-Length above the limit is refused at once (413); a body sent
  without one is counted as it arrives and refused when it passes the limit, so one request cannot make the
  server read and hold an arbitrarily large body.
"""
from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException


class Guard:
    def __init__(self, app, limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim = self.limits
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if lim.api_key is not None and scope.get("path") not in lim.open_paths:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), lim.api_key.encode()):
                return await _refuse(send, 401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                                     "invalid_api_key")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > lim.max_body_bytes:
            return await _refuse(send, 413, f"request body of {int(declared)} bytes is larger than this server "
                                            f"accepts (--max-body-bytes {lim.max_body_bytes})", "body_too_large")
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > lim.max_body_bytes:      # an HTTPException: the app answers it like any 4xx
                    raise HTTPException(413, f"request body is larger than this server accepts (--max-body-bytes "
                                             f"{lim.max_body_bytes})")
            return msg
        return await self.app(scope, counted, send)


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
