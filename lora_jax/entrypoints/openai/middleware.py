"""ASGI layers around every route, outermost first:

- RequestCounter: HTTP requests by route template and status (an unknown path is one label);
- ApiKey: with --api-key, every route but /health, /version and /metrics needs the key, and
  is refused before its body is read;
- BodyLimit: a body over --max-request-bytes is a 413 before any of it is parsed (a declared
  Content-Length at once; a chunked body as soon as it passes the limit).
"""

import hmac
import json

from prometheus_client import Counter

from lora_jax.entrypoints.openai.protocol import APIError

OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})
UNKNOWN_ROUTE = "unknown"


async def send_error(send, exc: APIError) -> None:
    body = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestCounter:
    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    @staticmethod
    def _template(scope) -> str:
        # The router leaves the route it matched in the scope; a request refused before
        # routing (a wrong key, a body too large) or matching none counts as unknown.
        route = scope.get("route")
        return getattr(route, "path", None) or UNKNOWN_ROUTE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.counter.labels(self._template(scope), str(status[0])).inc()


class ApiKey:
    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if (self.expected is not None and scope["type"] == "http"
                and scope["path"] not in OPEN_PATHS):
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                return await send_error(send, APIError(
                    "missing or wrong API key (send 'Authorization: Bearer KEY')", 401,
                    "AuthenticationError"))
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(f"the request body is larger than this server's limit of "
                        f"{self.max_bytes} bytes (--max-request-bytes)", 413,
                        "RequestTooLargeError")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await send_error(send, self._too_large())
        chunks, size, more = [], 0, True
        while more:  # the body, up to the limit, before the app parses any of it
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, self._too_large())
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what follows: a disconnect, for streams
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
