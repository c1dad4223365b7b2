"""The gateway's HTTP surface (FastAPI): OpenAI-compatible routes, health and metrics.

Routes only check the API key and hand over: completions to `serving.Completion`, the model list
to the warm-state core, /admin/models to `admin` (its own key). Every error, including unknown
routes, is answered in OpenAI's format.
"""

from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from services.gateway.admin import add_admin_routes
from services.gateway.core.errors import ApiError
from services.gateway.core.protocol import ROUTES
from services.gateway.core.warm import model_cards
from services.gateway.metrics import GatewayMetrics
from services.gateway.runtime import GatewayRuntime
from services.gateway.serving import AccessRecord, Completion
from shared.settings import Settings

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(settings: Settings, runtime: GatewayRuntime, metrics: GatewayMetrics,
               ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="WarmServe gateway", docs_url=None, redoc_url=None, openapi_url=None)
    completion = Completion(runtime, metrics, settings.max_body_bytes)
    api_keys = settings.accepted_api_keys

    def check_api_key(http: Request) -> None:
        if not api_keys:
            return
        scheme, _, key = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in api_keys:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def guarded(http: Request, endpoint: str) -> Response:
        try:
            check_api_key(http)
        except ApiError as exc:
            completion.log(AccessRecord(endpoint=endpoint, status=exc.status, error=exc.message))
            return JSONResponse(exc.body(), status_code=exc.status)
        return await completion(http, endpoint)

    def route(endpoint: str):
        async def handle(http: Request) -> Response:
            return await guarded(http, endpoint)
        return handle

    for endpoint, path in ROUTES.items():  # each answered by an instance of the body's model
        app.add_api_route(path, route(endpoint), methods=["POST"])

    @app.get("/v1/models")
    async def models(http: Request) -> Response:
        check_api_key(http)
        registry = await runtime.state.models()
        views = await runtime.state.node_views(alive_only=True)
        return JSONResponse(model_cards(registry, views, int(time.time())))

    @app.get("/v1/models/{model_id:path}")
    async def model(http: Request, model_id: str) -> Response:
        """OpenAI's retrieve: one card as /v1/models lists it."""
        check_api_key(http)
        info = await runtime.state.model(model_id)
        if info is None:
            raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        views = await runtime.state.node_views(alive_only=True)
        return JSONResponse(model_cards({model_id: info}, views, int(time.time()))["data"][0])

    add_admin_routes(app, settings, runtime)

    @app.get("/livez")
    async def livez() -> Response:
        return PlainTextResponse("ok")

    @app.get("/readyz")
    @app.get("/health")  # vLLM's OpenAI server's name for it, which its clients and load balancers probe
    async def readyz() -> Response:
        return PlainTextResponse("ready") if ready() else PlainTextResponse("not ready", status_code=503)

    @app.get("/metrics")
    async def prometheus(http: Request) -> Response:
        if settings.metrics_auth:
            check_api_key(http)
        return Response(metrics.render(), media_type=PROMETHEUS_TEXT)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        error = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    return app
