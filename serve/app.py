"""The HTTP layer: thin FastAPI routes, authentication, body limits, error handlers, and the server's lifecycle
(engine start, registry scanning, uvicorn, shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import gc
import hmac
import json
import logging
import signal
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import LoraplexError
from loraplex.serve.config import ServeConfig
from loraplex.serve.errors import APIError, error_response, model_not_found
from loraplex.serve.protocol import ChatCompletionRequest, CompletionRequest, RegisterAdapterRequest, dump
from loraplex.serve.serving import Serving, engine_unavailable

log = logging.getLogger("loraplex.serve")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
ENGINE_CHECK_INTERVAL_S = 0.5
# After the engine dies the server keeps answering (503, /ready red) this long, so load balancers see why, then
# exits non-zero so that its supervisor (Kubernetes, systemd, Docker) restarts it: a dead engine does not recover.
ENGINE_DEAD_EXIT_AFTER_S = 5.0


# ---------------------------------------------------------------- authentication

def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matching(token: str, keys: list[str]) -> str | None:
    """The key equal to `token`, if any. Every key is compared in constant time and the loop never stops
    early, so timing tells nothing about which key (or prefix) was close."""
    found = None
    for key in keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            found = key
    return found


def _matches(token: str, keys: list[str]) -> bool:
    return _matching(token, keys) is not None


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request) -> None:
    """Checks the bearer key and records which models it may use in `request.state.models` (None: all)."""
    config: ServeConfig = request.app.state.serving.config
    request.state.models = None
    if not config.any_keys():
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = _matching(token, [*config.api_keys, *config.scoped_keys, *([config.admin_key] if config.admin_key else [])])
    if key is None:
        raise _unauthorized("invalid API key")
    if key in config.scoped_keys and key not in config.api_keys and key != config.admin_key:
        request.state.models = config.scoped_keys[key]


def may_use(request: Request, model: str) -> bool:
    """Whether the request's key may see and use `model` (a served name: base, adapter or alias)."""
    patterns = getattr(request.state, "models", None)
    return patterns is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def require_model_access(request: Request, model: str) -> None:
    # The same 404 as for a model that does not exist: a key learns nothing about models it may not use.
    if not may_use(request, model):
        raise model_not_found(model)


def require_admin(request: Request) -> None:
    config: ServeConfig = request.app.state.serving.config
    if config.admin_key is None:
        if config.any_keys():
            raise APIError(403, "adapter administration is disabled: the server has API keys but no --admin-key",
                           code="admin_disabled")
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
    if not _matches(token, [config.admin_key]):
        if _matches(token, [*config.api_keys, *config.scoped_keys]):
            raise APIError(403, "this route needs the admin key", code="admin_key_required")
        raise _unauthorized("invalid admin key")


# ---------------------------------------------------------------- request body limit

class BodyLimit:
    """Reads the request body up front and refuses it with 413 beyond `max_bytes`, however it is sent
    (Content-Length or chunked), before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client gone before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = APIError(413, f"request body is larger than this server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        await error_response(error)(scope, receive, send)


# ---------------------------------------------------------------- error handlers

def _param(loc: tuple) -> str | None:
    """'messages[0].role' from pydantic's ('body', 'messages', 0, 'role'); stops at union branch names."""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_NAMES:
            param += ("." if param else "") + part
        else:
            break
    return param or None


def _counted(request: Request, error: APIError) -> JSONResponse:
    serving = getattr(request.app.state, "serving", None)
    if serving is not None:
        serving.metrics.errors.labels(str(error.status), error.code or "-").inc()
    return error_response(error)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error")
        return _counted(request, APIError(400, f"request body is not valid JSON: {reason}", code="invalid_json"))
    loc = tuple(first.get("loc", ()))
    param = _param(loc)
    if first.get("type") == "missing" and param is None:
        return _counted(request, APIError(400, "request body is required (a JSON object)", code="missing_body"))
    where = param or "request body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "missing":
        message = f"{where}: this field is required"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return _counted(request, APIError(400, message, param=param, code=code))


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _counted(request, exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    code = "not_found" if exc.status_code == 404 else None
    if exc.status_code == 400 and message == _FASTAPI_BODY_ERROR:
        # FastAPI's answer for a body json.loads could not take (not UTF-8, nested past the recursion limit).
        message, code = "request body is not valid JSON: not UTF-8 text, or nested too deeply", "invalid_json"
    return _counted(request, APIError(exc.status_code, message, code=code))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    from loraplex.serve.engine import is_engine_dead

    if is_engine_dead(exc):
        return _counted(request, engine_unavailable())
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _counted(request, APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error"))


# ---------------------------------------------------------------- disconnects

async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work):
    """Run a non-streaming handler, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, APIError):
            await task
        return Response(status_code=499)
    return task.result()


# ---------------------------------------------------------------- routes

def create_app(serving: Serving) -> FastAPI:
    # The OpenAPI schema documents the routes and request bodies (clients, fuzzers); it holds no model names.
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.serving = serving
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    from loraplex.serve.managed import add_platform_routes; add_platform_routes(app, serving)  # first: wins a path
    api = [Depends(require_api_key)]
    admin = [Depends(require_admin)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        from loraplex.serve.engine import engine_errored

        if engine_errored(serving.engine):
            raise engine_unavailable()
        return {"status": "ready"}

    @app.get("/metrics")
    def metrics(request: Request):
        # a plain def: FastAPI runs it in its thread pool, so rendering (pure Python, every series of every model:
        # ~80 ms for ~1 MB with 256 adapters) does not stop the event loop that streams every token; `name[]`
        # narrows the page to those series, as on vLLM's /metrics
        return Response(serving.metrics.render(request.query_params.getlist("name[]")),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=api)
    async def list_models(request: Request):
        models = await serving.model_list()
        models.data = [card for card in models.data if may_use(request, card.id)]
        return dump(models)

    @app.get("/v1/models/{model:path}", dependencies=api)
    async def get_model(model: str, request: Request):
        for card in (await serving.model_list()).data:
            if card.id == model and may_use(request, model):
                return dump(card)
        raise model_not_found(model)

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        require_model_access(request, body.model)
        return await until_disconnect(request, serving.chat(body, request))

    @app.post("/v1/completions", dependencies=api)
    async def completions(body: CompletionRequest, request: Request):
        require_model_access(request, body.model)
        return await until_disconnect(request, serving.completion(body, request))

    @app.get("/v1/adapters", dependencies=api)
    async def list_adapters(request: Request):
        await serving.adapters.scan()
        rows = [row for row in serving.adapters.describe() if may_use(request, row["name"])]
        return {"object": "list", "data": rows}

    @app.post("/v1/adapters", dependencies=admin)
    async def register_adapter(body: RegisterAdapterRequest):
        version = await serving.adapters.register(body.name, body.path)
        return {"name": version.name, "status": "loaded", "path": str(version.path), "rank": version.info.rank,
                "lora_id": version.lora_id}

    @app.delete("/v1/adapters/{name}", dependencies=admin)
    async def delete_adapter(name: str):
        await serving.adapters.unregister(name)
        return {"name": name, "deleted": True}

    return BodyLimit(app, serving.config.max_request_bytes)


# ---------------------------------------------------------------- lifecycle

async def _rescan_forever(serving: Serving, interval: float, changed: asyncio.Event) -> None:
    """Scan the registry and re-read the aliases every `interval` seconds, or at once when `changed` is set."""
    from loraplex.serve.aliases import load_aliases

    aliases_mtime = _mtime(serving.config.aliases_file)
    while True:
        try:
            await asyncio.wait_for(changed.wait(), interval)
        except asyncio.TimeoutError:  # builtin TimeoutError only from Python 3.11
            pass
        changed.clear()
        try:
            await serving.adapters.scan()
            mtime = _mtime(serving.config.aliases_file)
            if mtime != aliases_mtime:
                aliases_mtime = mtime
                serving.set_aliases(load_aliases(serving.config.aliases_file))
                log.info("aliases reloaded from %s", serving.config.aliases_file)
        except Exception as e:  # a bad file must not stop the scanning; it is logged and retried
            log.warning("registry scan failed: %s", e)


def outside_dot_directories(root: Path):
    """A watch filter passing changes outside dot-directories of `root`: a publish writes its files into a hidden
    staging directory (loraplex/registry.py) and then renames it into place, so only the rename needs a scan."""
    root = Path(root).resolve()

    def keep(_change, changed_path: str) -> bool:
        try:
            parts = Path(changed_path).resolve().relative_to(root).parts
        except ValueError:
            return True
        return not any(part.startswith(".") for part in parts)

    return keep


async def _watch_for_changes(path: Path, changed: asyncio.Event, *, file: Path | None = None) -> None:
    """Set `changed` as soon as the filesystem reports a change under `path` (inotify and the like, through
    watchfiles), or only to `file` in it, so that an adapter published into the registry is loaded before its
    first request rather than by it (about 0.1 s for an 8B model's rank-16 adapter on a GPU). The periodic scan
    stays: network and some container filesystems report nothing."""
    try:
        from watchfiles import awatch

        # a file's directory, not the file: editors and atomic writers replace the file with a new one
        async for _ in awatch(path, recursive=file is None, ignore_permission_denied=True,
                              watch_filter=outside_dot_directories(path) if file is None
                              else lambda _, changed_path: Path(changed_path) == file):
            changed.set()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # e.g. no inotify watches left: the periodic scan still runs
        log.warning("not watching %s for changes (%s); scanning every --scan-interval only", file or path, e)


async def _exit_when_engine_dies(serving: Serving, server, stopping: list[int], died: asyncio.Event) -> None:
    from loraplex.serve.engine import engine_errored

    while not engine_errored(serving.engine):
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
    if stopping:
        return  # Ctrl-C in a terminal, or SIGTERM to the process group, stops vLLM's engine core too
    died.set()
    log.error("the inference engine has died; answering 503 for %.0f s, then exiting for a restart",
              ENGINE_DEAD_EXIT_AFTER_S)
    await asyncio.sleep(ENGINE_DEAD_EXIT_AFTER_S)
    server.should_exit = True


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path else None
    except OSError:
        return None


# How often the server checks how late its event loop runs (loraplex_event_loop_lag_seconds)
LOOP_LAG_INTERVAL_S = 0.05


async def measure_loop_lag(observe, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Pass `observe`, forever, how late (seconds) a timer due every `interval_s` runs: the time the loop was held
    by other work (a garbage collection, a handler that blocks), which every stream then waits too."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))


def watch_gc_pauses(observe):
    """Pass `observe(generation, seconds)` every garbage collection of this process as it ends: the time it held
    the event loop, which every stream waits too. Returns the gc callback (to remove it with gc.callbacks.remove)."""
    started: list[float] = []

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            observe(info["generation"], time.perf_counter() - started.pop())

    gc.callbacks.append(on_collection)
    return on_collection


def freeze_startup_heap() -> None:
    """Leave what start-up built out of every later garbage collection. The imports (torch, transformers, vLLM)
    and the engine client make ~600,000 objects that live as long as the server, and each full collection walks
    them all while every stream waits: 300 ms on a 2-core CPU host. vLLM's own server freezes them for the same
    reason. On an H200 the streams' longest pause (median over a burst) fell from 478-810 ms to 254-442 ms with it
    (BENCHMARKS.md, thirteenth session)."""
    gc.collect()
    gc.freeze()


def event_loop_runner(choice: str):
    """What runs the server's main coroutine: `uvloop.run` for uvloop, and for auto where uvloop is installed
    (vLLM depends on it on Linux, and its own server and uvicorn's `--loop auto` run on it); `asyncio.run`
    otherwise. uvloop does the loop's callbacks and socket writes in C, but a streaming front end's time goes to
    Python (routes, protocol models, SSE): on CPU it saved nothing per token (benchmarks/front_end.py)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise LoraplexError("--event-loop uvloop: uvloop is not installed",
                                    hint="pip install uvloop, or pass --event-loop asyncio") from None
        else:
            return uvloop.run
    return asyncio.run


async def run(config: ServeConfig) -> None:
    """Start the engine, load the registry, serve until SIGINT/SIGTERM, then stop the engine."""
    import uvicorn

    from loraplex.registry import list_adapters
    from loraplex.serve import engine as eng
    from loraplex.serve.adapters import AdapterManager, base_module_shapes
    from loraplex.serve.aliases import load_aliases
    from loraplex.serve.metrics import Metrics, keep_latest_lora_info

    aliases = load_aliases(config.aliases_file)
    found, _ = list_adapters(config.adapters_dir, config.allowed_adapter_roots)
    base_modules = base_module_shapes(config.model_path)
    cpu = eng.on_cpu()
    loras = eng.lora_sizing([a.rank for a in found], base_modules, cpu=cpu, dtype=config.dtype,
                            max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras,
                            max_lora_rank=config.max_lora_rank)
    if warning := eng.fewer_slots_warning(len(found), loras):
        log.warning(warning)
    tokenizer = eng.load_tokenizer(config)
    engine = eng.build_engine(config, loras, cpu=cpu, adapter_dirs=[a.path for a in found],
                              base_modules=base_modules)
    log.info("engine metrics: %s", keep_latest_lora_info())
    scanner = watchdog = None
    watchers: list[asyncio.Task] = []
    engine_died = asyncio.Event()  # while serving, not because it was asked to stop
    try:
        adapters = AdapterManager(config.adapters_dir, engine, base_modules,
                                  loras.max_lora_rank, allowed_roots=config.allowed_adapter_roots)
        metrics = Metrics()
        serving = Serving(config, engine, tokenizer, adapters, aliases, metrics)
        await adapters.scan()
        if eng.warmup_wanted(config, cpu=cpu):
            from loraplex.serve.warmup import warm_up

            await warm_up(engine, adapters, loras.max_loras)
        metrics.bind(lambda: eng.unfinished_requests(engine), lambda: len(adapters.current),
                     lambda: len(adapters.unavailable))
        changed = asyncio.Event()
        scanner = asyncio.create_task(_rescan_forever(serving, config.scan_interval, changed))
        watchers = [asyncio.create_task(_watch_for_changes(config.adapters_dir, changed)),
                    asyncio.create_task(measure_loop_lag(metrics.loop_lag.observe))]
        if config.aliases_file is not None:
            aliases_file = config.aliases_file.resolve()
            watchers.append(asyncio.create_task(_watch_for_changes(aliases_file.parent, changed, file=aliases_file)))
        watch_gc_pauses(metrics.observe_gc_pause)
        freeze_startup_heap()
        log.info("serving %s and %d adapter(s) on http://%s:%d", config.served_name, len(adapters.current),
                 config.host, config.port)
        server = uvicorn.Server(uvicorn.Config(create_app(serving), host=config.host, port=config.port,
                                               log_level="info", timeout_graceful_shutdown=5))
        # uvicorn re-raises SIGTERM/SIGINT once it has stopped, which would end the process before the engine
        # core (a child process) is shut down below; route the signals to uvicorn's graceful exit instead.
        server.capture_signals = contextlib.nullcontext
        stop_signals: list[int] = []

        def stop(sig: int) -> None:
            stop_signals.append(sig)
            server.handle_exit(sig, None)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        watchdog = asyncio.create_task(_exit_when_engine_dies(serving, server, stop_signals, engine_died))
        await server.serve()
    finally:
        for task in (scanner, watchdog, *watchers):
            if task is not None:
                task.cancel()
        log.info("stopping the engine")
        engine.shutdown()
    if engine_died.is_set():
        raise LoraplexError("the inference engine died, so the server stopped",
                            hint="its error is in the log above; restart the server (a supervisor does this)")
