"""Tiled's per-request middleware, flattened (scatterbroker.server.tiled_layers) or as Tiled builds it.

Every behaviour of Tiled's six ``@app.middleware("http")`` layers is checked on
a real server twice: with ``flatten`` (the default) and with
``SCATTERBROKER_PLAIN_MIDDLEWARE=0`` (Tiled's stack untouched), so a difference
between the two fails here.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.middleware.base import BaseHTTPMiddleware

from conftest import API_KEY
from scatterbroker.server.app import build_app, local_config, serve_in_thread
from scatterbroker.server.tiled_layers import TiledLayers, flatten

CSRF = "tiled_csrf"  # Tiled's cookie name (its 403 message says "tiled_csrf_token")


@pytest.fixture(params=["plain", "tiled"])
def server(request, monkeypatch, tmp_path):
    """(stack name, base URL) of a server built with or without the flattened layers."""
    monkeypatch.setenv("SCATTERBROKER_PLAIN_MIDDLEWARE", "1" if request.param == "plain" else "0")
    data = tmp_path / "data"
    data.mkdir()
    # without the response cache, whose replays do not go through these layers
    app = build_app(local_config(tmp_path / "catalog", [data], api_key=API_KEY), response_cache=False)
    kinds = [m.cls for m in app.user_middleware]
    tiled_layers = [m for m in app.user_middleware if m.cls is BaseHTTPMiddleware]
    if request.param == "plain":
        assert TiledLayers in kinds and not tiled_layers
    else:
        assert TiledLayers not in kinds and len(tiled_layers) >= 5
    with serve_in_thread(app) as url:
        yield request.param, url


def cookies_set(response: httpx.Response) -> dict[str, str]:
    """name -> the whole ``set-cookie`` value, of each cookie the response sets."""
    return {value.split("=", 1)[0]: value for value in response.headers.get_list("set-cookie")}


def test_flatten_replaces_exactly_the_known_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("SCATTERBROKER_PLAIN_MIDDLEWARE", "0")
    app = build_app(local_config(tmp_path / "catalog", [], api_key=API_KEY))
    before = [m.cls.__name__ for m in app.user_middleware]
    monkeypatch.setenv("SCATTERBROKER_PLAIN_MIDDLEWARE", "1")
    assert flatten(app)
    after = [m.cls.__name__ for m in app.user_middleware]
    assert before.count("BaseHTTPMiddleware") == 6 and "BaseHTTPMiddleware" not in after
    assert after == [name for name in before if name != "BaseHTTPMiddleware"][:after.index("TiledLayers")] \
        + ["TiledLayers"] + [name for name in before if name != "BaseHTTPMiddleware"][after.index("TiledLayers"):]
    assert not flatten(app)  # nothing it knows is left: unchanged


def test_layers_it_does_not_know_are_left_alone(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SCATTERBROKER_PLAIN_MIDDLEWARE", "0")
    app = build_app(local_config(tmp_path / "catalog", [], api_key=API_KEY))
    monkeypatch.setenv("SCATTERBROKER_PLAIN_MIDDLEWARE", "1")
    del app.user_middleware[[m.cls for m in app.user_middleware].index(BaseHTTPMiddleware) + 2]
    before = list(app.user_middleware)
    with caplog.at_level(logging.WARNING, logger="scatterbroker.server.tiled_layers"):
        assert not flatten(app)
    assert app.user_middleware == before
    assert "not the one scatterbroker knows" in caplog.text


def test_a_fresh_client_gets_a_csrf_cookie_and_server_timing(server):
    _, url = server
    r = httpx.get(url + "/api/v1/metadata/", headers={"Authorization": f"Apikey {API_KEY}"})
    assert r.status_code == 200
    cookie = cookies_set(r)[CSRF]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and len(cookie.split(";")[0]) > len(CSRF) + 30
    assert "app;dur=" in r.headers["server-timing"]
    again = httpx.get(url + "/api/v1/metadata/", headers={"Authorization": f"Apikey {API_KEY}"},
                      cookies={CSRF: "already-have-one"})
    assert again.status_code == 200 and CSRF not in cookies_set(again)


def test_the_route_timings_are_reported(server):
    _, url = server
    r = httpx.get(url + "/api/v1/search/", headers={"Authorization": f"Apikey {API_KEY}"})
    assert r.status_code == 200
    timings = dict(part.strip().split(";", 1) for part in r.headers["server-timing"].split(","))
    assert timings["app"].startswith("dur=") and float(timings["app"][4:]) > 0


def test_an_old_tiled_client_is_refused_with_the_outer_layers_applied(server):
    _, url = server
    r = httpx.get(url + "/api/v1/metadata/", headers={"Authorization": f"Apikey {API_KEY}",
                                                       "User-Agent": "python-tiled/0.1.0a1"})
    assert r.status_code == 400 and "0.1.0a1" in r.json()["detail"]
    assert "server-timing" in r.headers and CSRF not in cookies_set(r)


def test_csrf_double_submit(server):
    stack, url = server
    api_cookie = {"tiled_api_key": API_KEY}
    post = url + "/api/v1/metadata/"  # creates a node: what passes the check is refused for its empty body
    r = httpx.post(post, cookies=api_cookie)
    assert r.status_code == 403 and r.text == "Expected tiled_csrf_token cookie"
    r = httpx.post(post, cookies={**api_cookie, CSRF: "tok"})
    assert r.status_code == 403 and "x-csrf header" in r.text
    r = httpx.post(post, cookies={**api_cookie, CSRF: "tok"}, headers={"x-csrf": "other"})
    assert r.status_code == 403 and r.text == "Double-submit CSRF tokens do not match"
    r = httpx.post(post, cookies={**api_cookie, CSRF: "tok"}, headers={"x-csrf": "tok"})
    assert r.status_code == 422
    r = httpx.post(post, cookies={CSRF: "tok"})  # no sensitive cookie: not checked (and no key)
    assert r.status_code == 401
    if stack == "plain":  # Tiled compares the query's list with the cookie and fails with a 500
        r = httpx.post(post + "?csrf=tok", cookies={**api_cookie, CSRF: "tok"})
        assert r.status_code == 422
        r = httpx.post(post + "?csrf=bad", cookies={**api_cookie, CSRF: "tok"})
        assert r.status_code == 403


def test_cookies_a_dependency_asks_for_are_set(server):
    _, url = server
    r = httpx.get(url + f"/api/v1/metadata/?api_key={API_KEY}")
    assert r.status_code == 200
    cookie = cookies_set(r)["tiled_api_key"]
    assert cookie.startswith(f"tiled_api_key={API_KEY};") and "HttpOnly" in cookie and "SameSite=lax" in cookie


def test_prometheus_sees_each_request(server):
    _, url = server

    def count(code: str) -> float:
        return sum(REGISTRY.get_sample_value("tiled_request_duration_seconds_count",
                                             {"method": "GET", "code": code, "endpoint": endpoint}) or 0
                   for endpoint in ("metadata", "unknown"))

    ok, refused = count("200"), count("401")
    for _ in range(3):
        assert httpx.get(url + "/api/v1/metadata/", headers={"Authorization": f"Apikey {API_KEY}"}).is_success
    assert httpx.get(url + "/api/v1/metadata/", headers={"Authorization": "Apikey wrong"}).status_code == 401
    assert count("200") - ok == 3 and count("401") - refused == 1


def test_the_access_log_names_the_principal(server):
    _, url = server
    from tiled.server.principal_log_filter import PrincipalFilter

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.principal)

    handler = Keep()
    handler.addFilter(PrincipalFilter())
    access = logging.getLogger("uvicorn.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        assert httpx.get(url + "/api/v1/metadata/", headers={"Authorization": f"Apikey {API_KEY}"}).is_success
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert seen and seen[-1] not in ("unset", "anon")
