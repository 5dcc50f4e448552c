"""Talking to an OpenAI-compatible server: the model list, and one timed streaming chat completion.

Timing follows vLLM's serving benchmark (vllm/benchmarks/lib/endpoint_request_func.py), with one difference:
the clock for TTFT and ITL ticks on chunks that carry generated text. vLLM's benchmark ticks on any chunk with
``choices``, and vLLM's chat endpoint sends a role-only chunk right with the first token; a server that sent that
role chunk before generating would then look fast. Counting text chunks gives the same numbers on vLLM and honest
ones elsewhere.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

from loraplex.errors import LoraplexError

RETRYABLE_STATUS = (429, 503)
MAX_ATTEMPTS = 4  # one try and up to three retries
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0


def api_base(base_url: str) -> str:
    """Accept both ``http://host:port`` and ``http://host:port/v1``."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def make_client(base_url: str, api_key: str | None, timeout_s: float):
    from openai import AsyncOpenAI

    # The SDK's own retries are off: retry policy (which errors, how often) lives in `timed_chat` alone.
    return AsyncOpenAI(base_url=api_base(base_url), api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0)


async def list_server_models(client, base_url: str) -> list[dict]:
    """The server's /v1/models entries; LoraplexError if the server cannot be reached or refuses us."""
    import openai

    try:
        page = await client.models.list()
    except openai.AuthenticationError:
        raise LoraplexError(
            f"the server at {base_url} refused the API key (401)", hint="pass the server's key with --api-key"
        ) from None
    except openai.APIConnectionError as e:
        raise LoraplexError(
            f"cannot reach the server at {api_base(base_url)} ({type(e).__name__}: {e.__cause__ or e})",
            hint="start it with `loraplex serve ...` or fix --base-url (e.g. http://localhost:8000)",
        ) from None
    except openai.APIStatusError as e:
        raise LoraplexError(
            f"GET {api_base(base_url)}/models answered HTTP {e.status_code}: {_error_message(e)}",
            hint="check that --base-url points to an OpenAI-compatible server",
        ) from None
    # The permission lists vLLM adds say nothing about the models; keep the identifying fields.
    return [{k: v for k, v in model.model_dump().items() if k != "permission"} for model in page.data]


def check_models(requested: list[str], server_models: list[dict], base_url: str) -> None:
    available = [m["id"] for m in server_models]
    missing = [name for name in requested if name not in available]
    if missing:
        raise LoraplexError(
            f"model(s) {', '.join(missing)} not served at {base_url}; available: {', '.join(available) or 'none'}",
            hint="pass names from that list to --models (adapters appear under their registry name)",
        )


@dataclass
class ChatResult:
    """One request's outcome. Times are milliseconds; ``error_type`` is None on success."""

    output: str = ""
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    e2e_ms: float | None = None
    tpot_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    attempts: int = 0
    started_at: float = 0.0  # wall clock (epoch seconds) of the last attempt's start
    finished_at: float = 0.0
    error_type: str | None = None
    error_message: str | None = None
    status_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def as_dict(self) -> dict:
        return asdict(self)


class _RetryableError(Exception):
    def __init__(self, error_type: str, message: str, status_code: int | None, retry_after: float | None):
        super().__init__(message)
        self.error_type, self.status_code, self.retry_after = error_type, status_code, retry_after


class _FatalError(_RetryableError):
    pass


def _error_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", None) or e)


def _retry_after(e) -> float | None:
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(float(value), BACKOFF_MAX_S) if value is not None else None
    except ValueError:
        return None


async def _within(seconds: float, coroutine):
    """Await `coroutine` for at most `seconds` (asyncio.TimeoutError after). asyncio.timeout where there is one
    (Python 3.11+): wait_for runs the coroutine as a task of its own, and a cancel (Ctrl-C) that lands just as that
    task finishes is dropped there, so the run would go on as if no one had pressed it."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coroutine
    return await asyncio.wait_for(coroutine, seconds)


def _classify(e: BaseException) -> _RetryableError:
    """Map an exception from the SDK or the stream to an error type and whether retrying can help."""
    import openai

    if isinstance(e, (asyncio.TimeoutError, openai.APITimeoutError)):
        # A timeout is not retried: a server this slow would only be slow again, multiplying the run time.
        return _FatalError("timeout", f"no complete answer within the timeout ({e.__class__.__name__})", None, None)
    if isinstance(e, openai.APIConnectionError):
        return _RetryableError("connection", f"{e.__cause__ or e}", None, None)
    if isinstance(e, openai.APIStatusError):
        cls = _RetryableError if e.status_code in RETRYABLE_STATUS else _FatalError
        return cls(f"http_{e.status_code}", _error_message(e), e.status_code, _retry_after(e))
    if isinstance(e, openai.APIError):  # an error event inside the stream
        return _FatalError("stream_error", _error_message(e), None, None)
    if isinstance(e, (ConnectionError, OSError)):
        return _RetryableError("connection", str(e), None, None)
    return _FatalError(type(e).__name__, str(e), None, None)


async def _stream_once(client, model: str, messages: list[dict], max_tokens: int, seed: int, result: ChatResult):
    """One attempt; fills ``result`` in place (timings in ms from just before the request is sent)."""
    start = time.perf_counter()
    result.started_at = time.time()
    pieces: list[str] = []
    last_text_at = None
    last_chunk_at = start
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            result.prompt_tokens = chunk.usage.prompt_tokens
            result.completion_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue  # the trailing usage chunk carries no token, so it does not move the end time
        choice = chunk.choices[0]
        text = choice.delta.content if choice.delta is not None else None
        if text:
            if last_text_at is None:
                result.ttft_ms = (now - start) * 1000
            else:
                result.itl_ms.append((now - last_text_at) * 1000)
            last_text_at = now
            pieces.append(text)
        if choice.finish_reason is not None:
            result.finish_reason = choice.finish_reason
        last_chunk_at = now
    result.output = "".join(pieces)
    result.e2e_ms = (last_chunk_at - start) * 1000
    result.finished_at = time.time()
    if result.ttft_ms is not None and result.completion_tokens and result.completion_tokens > 1:
        result.tpot_ms = (result.e2e_ms - result.ttft_ms) / (result.completion_tokens - 1)


async def timed_chat(
    client,
    model: str,
    messages: list[dict],
    *,
    max_tokens: int,
    seed: int,
    timeout_s: float,
    max_attempts: int = MAX_ATTEMPTS,
) -> ChatResult:
    """Stream one deterministic chat completion and time it. Never raises for server or network trouble:
    the error is recorded in the result. 429, 503 and connection errors are retried with exponential backoff
    (or the server's Retry-After); the timings are those of the attempt that answered."""
    for attempt in range(1, max_attempts + 1):
        result = ChatResult(attempts=attempt)
        try:
            # The SDK's timeout bounds each read; this bounds the whole streamed answer.
            await _within(timeout_s, _stream_once(client, model, messages, max_tokens, seed, result))
            return result
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a recorded, counted error
            error = _classify(e)
        result = ChatResult(
            attempts=attempt,
            started_at=result.started_at,
            finished_at=time.time(),
            error_type=error.error_type,
            error_message=str(error)[:500],
            status_code=error.status_code,
        )
        if isinstance(error, _FatalError) or attempt == max_attempts:
            return result
        delay = error.retry_after if error.retry_after is not None else BACKOFF_BASE_S * 2 ** (attempt - 1)
        await asyncio.sleep(min(delay, BACKOFF_MAX_S) * (1 + 0.1 * random.random()))
    raise AssertionError("unreachable")
