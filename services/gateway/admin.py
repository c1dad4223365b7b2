"""The gateway's /admin/models routes: the model registry over HTTP for automation (list, add,
show, remove), the operations `warmserve models` runs (shared.registry). Guarded by admin_api_keys
alone: with none configured every admin request is refused (403), a wrong or missing key gets 401.
Paths in an add are paths on the gateway's machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.core.errors import ApiError
from services.gateway.runtime import GatewayRuntime
from shared import registry
from shared.checkpoints import DEFAULT_TOOL_PARSER, CheckpointError, registry_entry
from shared.settings import Settings


class AddModel(BaseModel):
    """POST /admin/models: what `warmserve models add NAME PATH` takes."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1)
    tp: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    dtype: str | None = None
    tool_parser: str = DEFAULT_TOOL_PARSER


def add_admin_routes(app: FastAPI, settings: Settings, runtime: GatewayRuntime) -> None:
    keys = settings.accepted_admin_keys

    def check_admin_key(http: Request) -> None:
        if not keys:
            raise ApiError(403, "the admin routes are off: no admin_api_keys configured", kind="permission_error",
                           code="admin_disabled")
        scheme, _, key = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in keys:
            raise ApiError(401, "missing or invalid admin key (Authorization: Bearer ...)", code="invalid_api_key")

    async def views():
        return (await runtime.state.node_views(alive_only=True)).values()

    @app.get("/admin/models")
    async def list_models(http: Request) -> Response:
        check_admin_key(http)
        models, seen = await runtime.state.models(), list(await views())
        return JSONResponse({"object": "list", "data": [{**models[name].model_dump(),
                                                         "residency": registry.residency(name, seen)}
                                                        for name in sorted(models)]})

    @app.post("/admin/models")
    async def add_model(http: Request) -> Response:
        check_admin_key(http)
        try:
            body = AddModel.model_validate_json(await http.body())
        except ValidationError as exc:
            raise ApiError(400, f"bad body: {exc.errors(include_url=False)}", code="invalid_value") from None
        try:  # validation and hashing read the whole checkpoint: off the event loop
            info = await asyncio.to_thread(registry_entry, body.name, Path(body.path), body.tp, body.max_model_len,
                                           body.dtype, tool_parser=body.tool_parser)
            created = await registry.register(runtime.state, runtime.bus, info)
        except CheckpointError as exc:
            raise ApiError(400, str(exc), param="path", code="invalid_checkpoint") from None
        except registry.ModelConflict as exc:
            raise ApiError(409, str(exc), param="name", code="model_exists") from None
        return JSONResponse(info.model_dump(), status_code=201 if created else 200)

    @app.get("/admin/models/{name:path}")
    async def show_model(http: Request, name: str) -> Response:
        check_admin_key(http)
        described = await registry.describe(runtime.state, name)
        if described is None:
            raise ApiError(404, f"model {name!r} is not registered", param="name", code="model_not_found")
        return JSONResponse(described)

    @app.delete("/admin/models/{name:path}")
    async def remove_model(http: Request, name: str, force: bool = False) -> Response:
        """Refused (409) while this gateway holds or an instance runs requests of the model, unless ?force=true."""
        check_admin_key(http)
        seen = list(await views())
        requests = registry.requests_of(name, seen, runtime.scheduler.outstanding(name))
        try:
            removed = await registry.remove(runtime.state, runtime.bus, name, requests, force)
        except registry.ModelBusy as exc:
            raise ApiError(409, str(exc), param="name", code="model_busy") from None
        if removed is None:
            raise ApiError(404, f"model {name!r} is not registered", param="name", code="model_not_found")
        return JSONResponse({"id": name, "object": "model", "deleted": True, "requests": requests,
                             "residency": registry.residency(name, seen)})
