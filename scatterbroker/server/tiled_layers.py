"""Tiled's per-request ``@app.middleware("http")`` functions as one plain ASGI middleware.

Tiled's ``build_app`` (0.2.20) wraps every request in six functions declared
with ``@app.middleware("http")``, outermost first:

1. ``current_principal_logging_filter``: ``request.state.principal = None``;
   once the response starts, the ``current_principal`` context variable (read
   by Tiled's access-log filter) is set from it;
2. ``capture_metrics_prometheus`` (when Prometheus metrics are on, the
   default): the request's duration, size and timings into Tiled's
   Prometheus histograms, also for a request that raised (as a 500);
3. ``capture_metrics``: ``request.state.metrics`` for routes to fill, and the
   ``Server-Timing`` header with the app's duration up to the response start;
4. ``set_cookies``: ``request.state.cookies_to_set``, set on the response;
5. ``client_compatibility_check``: a ``python-tiled/<version>`` User-Agent
   older than Tiled supports gets a 400;
6. ``double_submit_cookie_csrf_protection``: an unsafe method carrying a
   sensitive cookie needs a matching CSRF token (else 403), and a response to
   a request without the CSRF cookie sets one.

Starlette runs each such function in a ``BaseHTTPMiddleware``: per request and
per layer a task group, a child task running the rest of the app, and a memory
stream that every response message crosses, so each message of each request
waits for six more turns of the event loop. Under ``benchmarks/load.py`` (32
clients, one process) the loop is the server's bottleneck, and requests that
reach Tiled's routes waited several hundred milliseconds for it.

:func:`flatten` replaces the six with :class:`TiledLayers`, which does the same
things in the same order in the request's own task: the checks before the app
runs, the header changes (CSRF cookie, cookies to set, ``Server-Timing``, the
Prometheus observation, the principal) when it sends ``http.response.start``,
innermost first as Tiled's layers did. Early answers (400, 403) go through the
outer layers' changes as before. One difference: a CSRF token given as the
``csrf`` query parameter is compared as a string (Tiled compared the list
``parse_qs`` returns with the cookie, which raised: a 500).

Measured (``benchmarks/load.py --baseline tiled-layers``, 32 clients, 60 s
each, same run, 2026-12-02): requests/s x1.07 (360 -> 386), p99 x0.94 (529
-> 498 ms). ``flatten`` only acts on exactly the layers
it knows, in Tiled's order (another Tiled version leaves the app as it is and
says so in the log), and ``SCATTERBROKER_PLAIN_MIDDLEWARE=0`` turns it off.
``tests/test_tiled_layers.py`` checks each behaviour on both stacks. Because
this copy includes Tiled's CSRF check, a Tiled whose layers changed makes the
server refuse to start (:mod:`scatterbroker.server.tiled_compat`) until the
copy is ported or ``SCATTERBROKER_PLAIN_MIDDLEWARE=0`` keeps Tiled's layers.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
import urllib.parse
import warnings
from types import SimpleNamespace
from typing import Any

import packaging.version
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from tiled.server import metrics as prometheus_metrics
from tiled.server.app import (CSRF_HEADER_NAME, CSRF_QUERY_PARAMETER, MINIMUM_SUPPORTED_PYTHON_CLIENT_VERSION,
                              SAFE_METHODS, SENSITIVE_COOKIES, current_principal)
from tiled.server.utils import CSRF_COOKIE_NAME

from scatterbroker.environment import env_flag
from scatterbroker.server import tiled_compat
from scatterbroker.server.tiled_compat import raw_python_tiled_client_version

logger = logging.getLogger(__name__)

#: Tiled's layers, outermost first, and whether each is always there (Prometheus's is when metrics are on)
KNOWN = (
    ("current_principal_logging_filter", True),
    ("capture_metrics_prometheus", False),
    ("capture_metrics", True),
    ("set_cookies", True),
    ("client_compatibility_check", True),
    ("double_submit_cookie_csrf_protection", True),
)


def _tiled_layer(m: Any) -> str | None:
    """The name of a Tiled ``@app.middleware("http")`` function ``m`` runs, else None."""
    dispatch = m.kwargs.get("dispatch") if m.cls is BaseHTTPMiddleware else None
    if dispatch is None or getattr(dispatch, "__module__", None) != "tiled.server.app":
        return None
    return dispatch.__name__


def flatten(app: Any) -> bool:
    """Replace Tiled's ``@app.middleware("http")`` layers of ``app`` (not yet started) by
    :class:`TiledLayers`; False (and the app unchanged) if they are not exactly :data:`KNOWN`.

    It replaces Tiled's CSRF check: if Tiled's layers are not the source this was written for
    (:mod:`scatterbroker.server.tiled_compat`, piece ``request-layers``), the server refuses to
    start unless ``SCATTERBROKER_PLAIN_MIDDLEWARE=0`` keeps Tiled's own."""
    if not env_flag("SCATTERBROKER_PLAIN_MIDDLEWARE", True):
        return False
    done: list[bool] = []
    tiled_compat.install("request-layers", lambda: done.append(_flatten(app)))
    return bool(done and done[0])


def _flatten(app: Any) -> bool:
    names = [_tiled_layer(m) for m in app.user_middleware]
    found = [i for i, name in enumerate(names) if name is not None]
    layers = [names[i] for i in found]
    expected = [name for name, required in KNOWN if required or name in layers]
    if not found or layers != expected or found != list(range(found[0], found[0] + len(found))):
        logger.warning("Tiled's request middleware is not the one scatterbroker knows (%s); left as it is",
                       ", ".join(map(str, layers)) or "none found")
        return False
    prometheus = "capture_metrics_prometheus" in layers
    app.user_middleware[found[0]:found[-1] + 1] = [Middleware(TiledLayers, prometheus=prometheus)]
    return True


def _cookie(params: dict[str, Any]) -> tuple[bytes, bytes]:
    """The ``set-cookie`` header Starlette's ``Response.set_cookie(**params)`` makes."""
    response = Response()
    response.set_cookie(**params)
    return next(item for item in response.raw_headers if item[0] == b"set-cookie")


def _early(request: Request, headers: Headers) -> Response | None:
    """What Tiled's client-version and CSRF checks answer before the app runs, or None."""
    raw_version = raw_python_tiled_client_version(request)
    if raw_version is not None:
        try:
            parsed = packaging.version.parse(raw_version)
        except Exception as caught:
            message = (f"Python Tiled client version is reported as {raw_version}. "
                       "This cannot be parsed as a valid version.")
            logging.getLogger("tiled.server.app").warning(message)
            if isinstance(caught, packaging.version.InvalidVersion):
                warnings.warn(message)
        else:
            if not parsed.is_devrelease and parsed < MINIMUM_SUPPORTED_PYTHON_CLIENT_VERSION:
                return JSONResponse(status_code=400, content={"detail": (
                    f"Python Tiled client reports version {parsed}. "
                    f"Version {MINIMUM_SUPPORTED_PYTHON_CLIENT_VERSION} or higher "
                    "is needed to communicate with this Tiled server.")})
    if request.method in SAFE_METHODS or "cookie" not in headers:
        return None
    cookies = request.cookies
    if not set(cookies).intersection(SENSITIVE_COOKIES):
        return None
    csrf_cookie = cookies.get(CSRF_COOKIE_NAME)
    if not csrf_cookie:
        return Response(status_code=403, content="Expected tiled_csrf_token cookie")
    token = headers.get(CSRF_HEADER_NAME)
    if token is None:  # Tiled compares the list parse_qs gives, which raises (a 500): its first value here
        token = next(iter(urllib.parse.parse_qs(request.scope.get("query_string", b"").decode("latin-1"))
                          .get(CSRF_QUERY_PARAMETER, ())), None)
    if not token:
        return Response(status_code=403, content=(
            f"Expected {CSRF_QUERY_PARAMETER} query parameter or {CSRF_HEADER_NAME} header"))
    if not secrets.compare_digest(token.encode(), csrf_cookie.encode()):
        return Response(status_code=403, content="Double-submit CSRF tokens do not match")
    return None


class TiledLayers:
    """ASGI middleware doing what Tiled's six ``@app.middleware("http")`` layers do (module docstring)."""

    def __init__(self, app: Any, prometheus: bool = True) -> None:
        self.app = app
        self.prometheus = prometheus

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["principal"] = None
        metrics: Any = collections.defaultdict(lambda: collections.defaultdict(lambda: 0))
        state["metrics"] = metrics
        state["cookies_to_set"] = []
        t0 = time.perf_counter()
        request = Request(scope)  # one for the checks and Prometheus: its cookies are parsed once
        headers = Headers(scope=scope)
        early = _early(request, headers)
        # Tiled's CSRF layer sets the cookie only on what the app answered
        new_csrf = early is None and not ("cookie" in headers and request.cookies.get(CSRF_COOKIE_NAME))
        started = False

        async def send_changed(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                out = MutableHeaders(raw=list(message.get("headers") or ()))
                if new_csrf:
                    out.raw.append(_cookie({"key": CSRF_COOKIE_NAME, "value": secrets.token_urlsafe(32),
                                            "httponly": True, "samesite": "lax"}))
                for params in state["cookies_to_set"]:
                    params.setdefault("httponly", True)
                    params.setdefault("samesite", "lax")
                    out.raw.append(_cookie(params))
                metrics["app"]["dur"] += time.perf_counter() - t0
                out["Server-Timing"] = ", ".join(
                    f"{key};" + ";".join(
                        f"{metric}={value * 1000:.1f}" if metric == "dur" else f"{metric}={value:.1f}"
                        for metric, value in metrics_.items())
                    for key, metrics_ in metrics.items())
                message = {**message, "headers": out.raw}
                if self.prometheus:
                    self._observe(request, message["status"], Headers(raw=out.raw))
                current_principal.set(state["principal"])
            await send(message)

        if early is not None:
            await early(scope, receive, send_changed)
            return
        try:
            await self.app(scope, receive, send_changed)
        except Exception:
            if self.prometheus and not started:  # Tiled observes a request that raised as a 500, re-raises
                self._observe(request, 500, Headers())
            raise

    @staticmethod
    def _observe(request: Request, status: int, headers: Headers) -> None:
        prometheus_metrics.capture_request_metrics(request, SimpleNamespace(status_code=status, headers=headers))
