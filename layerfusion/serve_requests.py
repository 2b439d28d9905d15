"""The request check of `layerfusion serve`: ASGI middleware that answers a bad `POST /predict` body with a
4xx JSON error naming what is wrong, before it reaches LitServe's queue and the inference workers."""

from __future__ import annotations

import json
from typing import Any

MAX_TEXTS, MAX_BODY_BYTES = 256, 1 << 20


class RequestGuard:
    """ASGI middleware in front of `POST /predict`: a request that is not a valid body gets a 4xx JSON
    `{"detail": ...}` naming what is wrong, and never reaches the inference workers.

    Args:
        app: the ASGI app it wraps.
        max_texts: most texts one request may carry.
        max_body_bytes: largest request body accepted (413 beyond it).
    """

    def __init__(
        self, app, max_texts: int = MAX_TEXTS, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app, self.max_texts, self.max_body_bytes = app, max_texts, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, status, problem = await self._read(scope, receive)
        if problem is None:
            status, problem = self._check(body)
        if problem is not None:
            await _send_json(send, status, {"detail": problem})
            return
        # the body is JSON: say so (curl -d sends form-urlencoded), and hand it on unchanged
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> tuple[bytes, int, str | None]:
        """The whole body, or the reason it is refused: too large (413) or the client left (400)."""
        limit = self.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", 413, f"request body of {int(length)} bytes is over the {limit}-byte limit"
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", 400, "the client disconnected before sending the whole body"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", 413, f"request body is over the {limit}-byte limit"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), 200, None

    def _check(self, body: bytes) -> tuple[int, str | None]:
        """(status, problem) of a request body: 400 when it is not JSON, 422 when the JSON is not a request."""
        if not body.strip():
            return 400, 'no request body: send JSON {"text": "..."} or {"texts": ["...", ...]}'
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return 400, f"request body is not valid JSON ({err})"
        if not isinstance(request, dict):
            return 422, f"request body is a JSON {_json_type(request)}, not an object"
        unknown = sorted(set(request) - {"text", "texts", "top_k"})
        if unknown:
            return 422, f"unknown field(s) {unknown}: a request has 'text' or 'texts', and 'top_k'"
        if ("text" in request) == ("texts" in request):
            both = "both" if "text" in request else "neither"
            return 422, f"request has {both} 'text' and 'texts': give exactly one"
        top_k = request.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            return 422, f"'top_k' must be a positive integer, got {json.dumps(top_k)}"
        if "text" in request:
            return _check_text(request["text"], "'text'")
        texts = request["texts"]
        if not isinstance(texts, list):
            return 422, f"'texts' must be a list of strings, got a JSON {_json_type(texts)}"
        if not texts:
            return 422, "'texts' is empty: give at least one text"
        if len(texts) > self.max_texts:
            return 422, f"'texts' has {len(texts)} texts; at most {self.max_texts} per request"
        for i, text in enumerate(texts):
            status, problem = _check_text(text, f"'texts'[{i}]")
            if problem:
                return status, problem
        return 200, None


def _check_text(text: Any, where: str) -> tuple[int, str | None]:
    if not isinstance(text, str):
        return 422, f"{where} must be a string, got a JSON {_json_type(text)}"
    if not text.strip():
        return 422, f"{where} is empty (or only whitespace)"
    return 200, None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


async def _send_json(send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
