"""Managed inference endpoints: the container contracts of AWS SageMaker and Google Vertex AI (`--platform`).

SageMaker starts the image with the argument `serve`, checks `GET /ping` and sends requests to
`POST /invocations`, on port 8080 (or `$SAGEMAKER_BIND_TO_PORT`). Vertex AI names the port and both routes in
`AIP_HTTP_PORT`, `AIP_HEALTH_ROUTE` and `AIP_PREDICT_ROUTE`; its `predict` wraps requests as
`{"instances": [...], "parameters": {...}}` and expects `{"predictions": [...]}`, while `rawPredict` passes the
body through unchanged.

Both routes take the body of `POST /v1/chat/completions`; the Vertex route also takes the instances shape, each
instance a chat completion body (`parameters` fill the fields an instance leaves out) and each prediction the
`chat.completion` object. The platform authenticates callers itself (IAM) and forwards no bearer key, so these
routes need none; `--api-key` still guards `/v1`.

This module is imported by the CLI before anything heavy: FastAPI is imported inside `add_platform_routes`.
"""

import os

from loraplex.errors import LoraplexError

PLATFORMS = ("sagemaker", "vertex")
DEFAULT_PORT = 8000
PLATFORM_PORT = 8080  # both platforms' default
VERTEX_DEFAULT_HEALTH_ROUTE = "/health"
VERTEX_DEFAULT_PREDICT_ROUTE = "/predict"


def _env_port(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    if not value.isdigit():
        raise LoraplexError(f"${name}={value!r} is not a port number", hint="unset it or pass --port")
    return int(value)


def listen_address(platform: str | None, host: str | None, port: int | None) -> tuple[str, int]:
    """Where to listen: the flags when given, else the platform's port on every interface (the platform connects
    from outside the container), else 127.0.0.1:8000."""
    if platform == "sagemaker":
        default_port = _env_port("SAGEMAKER_BIND_TO_PORT") or PLATFORM_PORT
    elif platform == "vertex":
        default_port = _env_port("AIP_HTTP_PORT") or PLATFORM_PORT
    else:
        default_port = DEFAULT_PORT
    return host or ("0.0.0.0" if platform else "127.0.0.1"), port if port is not None else default_port


def vertex_routes() -> tuple[str, str]:
    """(health route, predict route) as Vertex AI sets them; defaults for running the container elsewhere."""
    return (os.environ.get("AIP_HEALTH_ROUTE") or VERTEX_DEFAULT_HEALTH_ROUTE,
            os.environ.get("AIP_PREDICT_ROUTE") or VERTEX_DEFAULT_PREDICT_ROUTE)


def add_platform_routes(app, serving) -> None:
    """Add the routes of `serving.config.platform`, if any. Called before the app's own routes are added, so a
    platform route wins over one of the same path (Vertex's health route may well be `/health`, which must then
    answer for readiness, not mere liveness)."""
    import asyncio
    import json
    from typing import Any

    from fastapi import Body, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from loraplex.serve.app import until_disconnect
    from loraplex.serve.engine import engine_errored
    from loraplex.serve.errors import bad_request
    from loraplex.serve.protocol import MAX_PROMPTS, ChatCompletionRequest
    from loraplex.serve.serving import engine_unavailable

    platform = serving.config.platform
    if platform is None:
        return

    async def ready():
        # The server listens only once the engine is up; 503 once it has died, so the platform replaces us.
        if engine_errored(serving.engine):
            raise engine_unavailable()
        return {"status": "ready"}

    async def chat(body: ChatCompletionRequest, request: Request):
        return await until_disconnect(request, serving.chat(body, request))

    def chat_request(data: Any, loc: tuple) -> ChatCompletionRequest:
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            # The app's validation handler turns these into the usual 400 naming the field (instances[0].model).
            raise RequestValidationError([{**err, "loc": ("body", *loc, *err["loc"])}
                                          for err in e.errors(include_url=False)]) from None

    async def predictions(payload: dict, request: Request) -> dict:
        instances, parameters = payload["instances"], payload.get("parameters") or {}
        if not isinstance(instances, list) or not instances:
            raise bad_request("instances must be a non-empty list of chat completion requests", "instances")
        if len(instances) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} instances per request", "instances")
        if not isinstance(parameters, dict):
            raise bad_request("parameters must be an object of chat completion fields", "parameters")
        bodies = [chat_request({**parameters, **item} if isinstance(item, dict) else item, ("instances", i))
                  for i, item in enumerate(instances)]
        for i, body in enumerate(bodies):
            if body.stream:
                raise bad_request("predictions cannot stream; send one chat completion body (rawPredict) to stream",
                                  f"instances[{i}].stream")
        # Each instance is its own engine request, so they are batched together; the first error answers for all.
        results = await asyncio.gather(*(serving.chat(body, request) for body in bodies), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {"predictions": [json.loads(response.body) for response in results]}

    async def predict(request: Request, payload: Any = Body()):
        if isinstance(payload, dict) and "instances" in payload:
            return await until_disconnect(request, predictions(payload, request))
        return await until_disconnect(request, serving.chat(chat_request(payload, ()), request))

    if platform == "sagemaker":
        app.add_api_route("/ping", ready, methods=["GET"])
        app.add_api_route("/invocations", chat, methods=["POST"])
    elif platform == "vertex":
        health_route, predict_route = vertex_routes()
        app.add_api_route(health_route, ready, methods=["GET"])
        app.add_api_route(predict_route, predict, methods=["POST"])
