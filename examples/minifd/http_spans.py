"""The HTTP server span: one SERVER span per request, the parent of the request span.

Why not ``FastAPIInstrumentor``: measured on this server (docs/BENCHMARKS.md, issue 13), the contrib
ASGI middleware costs about 0.2-0.5 ms of CPU per request, more than all of our tracing together:
it decodes every header for each of its ~10 lookups, walks the routes for the route name, and sets
a dozen attributes and metrics per request.  What the trace needs from it is small: the caller's
``traceparent`` continued, a SERVER span named ``{method} {route}`` with the stable HTTP semantic
convention attributes, the status code, and ERROR on a 5xx.  That is what this middleware does.
The span itself is ``fastdeploy_otel.start_server_span``: an SDK span was still a third of all
tracing's instructions in this server (docs/BENCHMARKS.md).  ``MINIFD_HTTP_SPANS=contrib`` selects
``FastAPIInstrumentor`` instead, ``off`` none.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

import fastdeploy_otel as fdt

_PROPAGATED = (b"traceparent", b"tracestate", b"baggage")


class ServerSpans:
    """ASGI middleware: a SERVER span around each HTTP request not in `excluded_paths`."""

    def __init__(self, app: Any, excluded_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.excluded = frozenset(excluded_paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _PROPAGATED}
        parent = propagate.extract(carrier) if carrier else None
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        span = fdt.start_server_span(
            f"{method} {path}",
            context=parent,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "url.scheme": scope.get("scheme", "http"),
                "client.address": client[0] if client else "",
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 0

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except BaseException as exc:
            span.record_exception(exc)
            status = status or 500
            raise
        finally:
            route = scope.get("route")  # set by the router once a route matched
            if route is not None and hasattr(route, "path"):
                span.set_attributes({"http.route": route.path, "http.response.status_code": status})
            else:
                if status == 404:
                    span.update_name(method)  # an unknown path must not become a span name (cardinality)
                span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            otel_context.detach(token)
