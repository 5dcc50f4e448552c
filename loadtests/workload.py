"""What a load test sends and how one streamed answer is timed. Shared by the locustfile and `loraplex loadtest`.

This module never imports locust: importing locust monkey-patches the standard library for gevent, which only the
locust process itself may do (the `loraplex loadtest` command and the test suite import this module too).

Timing follows the eval harness (loraplex.eval.client): TTFT is the time from just before the request is sent to
the first chunk that carries generated text, ITL the gaps between consecutive text chunks, end-to-end the time to
the last chunk of the answer. The trailing usage chunk does not move the end time.
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from loraplex.errors import LoraplexError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_DATA = Path("runs/demo/prepared/val.jsonl")  # the example dataset's held-out rows (`loraplex demo`)
CHAT_PATH = "/v1/chat/completions"
# Generic requests for when no held-out data is at hand: short and long, questions and instructions.
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences what a hash table is.",
    "Write a haiku about the sea.",
    "List three uses of the Python `itertools` module.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do I reverse a list in Python?",
    "Give me a short recipe for pancakes.",
    "What is the difference between TCP and UDP?",
    "Translate 'good morning, how are you?' into French.",
    "Write a one-line docstring for a function that merges two sorted lists.",
    "Why is the sky blue?",
    "Suggest a name for a bakery that sells only croissants.",
)


# ---------------------------------------------------------------- small parsers


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """'a, b,c' (or a list of such strings) -> ['a', 'b', 'c'], blanks dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


_TIMESPAN = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s?)?$")


def parse_duration(text: str | int | float) -> int:
    """Locust's run-time syntax ('90', '90s', '2m', '1h30m') -> whole seconds.

    Written here rather than taken from locust.util.timespan: importing anything from locust patches the standard
    library for gevent, which `loraplex loadtest` (a plain process that only starts locust) must not do."""
    if isinstance(text, (int, float)):
        seconds = int(text)
    else:
        match = _TIMESPAN.match(str(text).strip().lower())
        if not match or not any(match.groupdict().values()):
            raise LoraplexError(f"bad duration {text!r}", hint="use seconds or locust's syntax: 90, 90s, 2m, 1h30m")
        seconds = 3600 * int(match["h"] or 0) + 60 * int(match["m"] or 0) + int(match["s"] or 0)
    if seconds <= 0:
        raise LoraplexError(f"duration {text!r} is not positive", hint="pass e.g. --duration 60s")
    return seconds


# ---------------------------------------------------------------- the adapter mix


def parse_mix(spec: str) -> tuple[str, float | None]:
    """'uniform' -> ('uniform', None); 'zipf:1.1' -> ('zipf', 1.1)."""
    kind, _, exponent = (spec or "").strip().lower().partition(":")
    if kind == "uniform" and not exponent:
        return "uniform", None
    if kind == "zipf":
        try:
            s = float(exponent) if exponent else 1.0
        except ValueError:
            s = math.nan
        if math.isfinite(s) and s > 0:
            return "zipf", s
        raise LoraplexError(f"bad Zipf exponent in --mix {spec!r}", hint="use a positive number, e.g. --mix zipf:1.1")
    raise LoraplexError(f"unknown --mix {spec!r}", hint="use --mix uniform or --mix zipf:S (e.g. zipf:1.1)")


def mix_weights(models: Sequence[str], spec: str = "uniform") -> dict[str, float]:
    """Share of requests per model, summing to 1. Zipf gives the k-th listed model a share proportional to
    1/k^S: the first model is the most popular, as with real traffic to a few hot adapters and a long tail."""
    if not models:
        raise LoraplexError("no models to send requests to", hint="pass --models a,b,c (names from GET /v1/models)")
    kind, s = parse_mix(spec)
    raw = [1.0] * len(models) if kind == "uniform" else [1.0 / rank**s for rank in range(1, len(models) + 1)]
    total = sum(raw)
    return {model: w / total for model, w in zip(models, raw)}


class ModelPicker:
    """Draws the model of each request from the mix weights (seeded, so a run's mix can be repeated)."""

    def __init__(self, weights: dict[str, float], seed: int = 0):
        self.models = list(weights)
        self.cum_weights = []
        acc = 0.0
        for model in self.models:
            acc += weights[model]
            self.cum_weights.append(acc)
        self._rng = random.Random(seed)

    def __call__(self) -> str:
        return self._rng.choices(self.models, cum_weights=self.cum_weights)[0]


# ---------------------------------------------------------------- the target server


def server_root(base_url: str) -> str:
    """Accept both http://host:port and http://host:port/v1; requests go to <root>/v1/..."""
    root = (base_url or "").strip().rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not resolved on purpose, so DNS cannot redirect the load elsewhere
        return False


def check_target(base_url: str, allow_remote: bool = False) -> str:
    """The server root to load, or LoraplexError: only http(s) URLs, and only loopback unless allowed."""
    root = server_root(base_url)
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoraplexError(f"--base-url {base_url!r} is not an http(s) URL",
                            hint=f"pass e.g. --base-url {DEFAULT_BASE_URL}")
    if not allow_remote and not is_loopback(parts.hostname):
        raise LoraplexError(
            f"refusing to send load to {parts.hostname}: it is not a loopback address",
            hint="load-test only servers you run; for one on another machine pass --allow-remote explicitly",
        )
    return root


def fetch_server_models(root: str, api_key: str | None, timeout_s: float = 10.0) -> list[dict]:
    """GET /v1/models. Synchronous (httpx) because the locust process runs on gevent, not asyncio."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{root}/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise LoraplexError(f"cannot reach the server at {url} ({type(e).__name__}: {e})",
                            hint="start it with `loraplex serve ...` or fix --base-url") from None
    if response.status_code == 401:
        raise LoraplexError(f"the server at {root} refused the API key (401)", hint="pass its key with --api-key")
    if response.status_code != 200:
        raise LoraplexError(f"GET {url} answered HTTP {response.status_code}: {response.text[:200]}",
                            hint="check that --base-url points to an OpenAI-compatible server")
    try:
        return list(response.json()["data"])
    except (ValueError, KeyError, TypeError):
        raise LoraplexError(f"GET {url} did not answer an OpenAI model list", hint="check --base-url") from None


def base_model_name(server_models: list[dict]) -> str | None:
    """The served base model: loraplex marks it kind='base'; vLLM and others give adapters a `parent`."""
    for entry in server_models:
        if entry.get("kind") == "base":
            return entry["id"]
    for entry in server_models:
        if "kind" not in entry and not entry.get("parent"):
            return entry["id"]
    return None


def resolve_models(requested: Sequence[str], server_models: list[dict], include_base: bool) -> list[str]:
    """The models of the mix: those requested (all served ones when none are), the base model first when
    `include_base`; every name must be served."""
    available = [m["id"] for m in server_models]
    models = list(dict.fromkeys(requested)) or list(available)
    if include_base:
        base = base_model_name(server_models)
        if base is None:
            raise LoraplexError("cannot tell which served model is the base model (GET /v1/models)",
                                hint="list the base model's name in --models instead of --include-base")
        models = [base] + [m for m in models if m != base]
    missing = [m for m in models if m not in available]
    if missing:
        raise LoraplexError(f"model(s) {', '.join(missing)} not served; available: {', '.join(available) or 'none'}",
                            hint="pass names from GET /v1/models to --models")
    if not models:
        raise LoraplexError("the server lists no models", hint="check the server's adapter registry")
    return models


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompts:
    conversations: list[list[dict]]  # chat messages of each request
    source: str  # where they came from, for the summary
    path: Path | None = None  # the data file, None for the built-in prompts
    skipped_rows: int = 0  # data rows that could not be parsed


def load_prompts(data: str | Path | None) -> Prompts:
    """Prompts from a JSONL file in any training format; with no file, the example set's held-out rows when
    present (runs/demo/prepared/val.jsonl), else a small built-in list of generic requests."""
    from loraplex.eval.runner import load_samples  # the eval harness's reader: same formats, same bad-row handling

    path = Path(data) if data else (DEFAULT_DATA if DEFAULT_DATA.is_file() else None)
    if path is None:
        return Prompts([[{"role": "user", "content": p}] for p in BUILTIN_PROMPTS],
                       f"built-in generic prompts ({len(BUILTIN_PROMPTS)}; no --data and no {DEFAULT_DATA})")
    samples, bad, _ = load_samples(path)
    if not samples:
        first = f"; line {bad[0]['line']}: {bad[0]['message']}" if bad else ""
        raise LoraplexError(f"no usable rows in {path}{first}",
                            hint="pass a JSONL file of prompt/completion or messages rows to --data")
    return Prompts([s.messages for s in samples], f"{path} ({len(samples)} rows)", path.resolve(), len(bad))


def chat_body(model: str, messages: list[dict], max_tokens: int) -> dict:
    """A streamed chat request asking for token usage in the last chunk. Sampling stays at the server's
    defaults (like a typical client); output lengths then vary, which is why output tokens are measured."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# ---------------------------------------------------------------- one streamed answer


@dataclass
class RequestRecord:
    """One request as written to the records file. Times in ms; error_type None on success. Field names follow
    the eval harness's ChatResult."""

    model: str
    started_at: float  # epoch seconds
    finished_at: float = 0.0
    ok: bool = False
    error_type: str | None = None  # http_<status>, timeout, connection, stream_error, bad_stream
    error_message: str | None = None
    status_code: int | None = None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    e2e_ms: float | None = None
    completion_tokens: int | None = None
    tokens_from: str | None = None  # "usage" or "chunks" (no usage chunk: text chunks counted instead)
    prompt_tokens: int | None = None
    finish_reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class BadStream(Exception):
    """The server broke the streaming protocol (error_type bad_stream) or sent an error event (stream_error)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class StreamTimer:
    """Reads a chat completion's server-sent events, as the bytes arrive, and times the generated text.

    The few lines of SSE parsing are written here because locust's HTTP clients hand over raw bytes and the openai
    SDK's decoder is private; OpenAI-compatible servers send one `data: <json>` line per event."""

    def __init__(self, sent_at: float):
        self.sent_at = sent_at  # perf_counter() just before the request was sent
        self._buffer = b""
        self._last_text_at: float | None = None
        self._last_chunk_at = sent_at
        self.done = False
        self.ttft_ms: float | None = None
        self.itl_ms: list[float] = []
        self.text_chunks = 0
        self.usage: dict | None = None
        self.finish_reason: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        """Bytes received at `now` (perf_counter seconds)."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.strip(), now)

    def _line(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, `event:` / `id:` fields
        payload = line[5:].strip()
        if self.done:
            raise BadStream("bad_stream", "data after [DONE]")
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            raise BadStream("bad_stream", f"an event is not JSON: {payload[:120]!r}") from None
        if not isinstance(event, dict):
            raise BadStream("bad_stream", f"an event is not a JSON object: {payload[:120]!r}")
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
            raise BadStream("stream_error", str(error.get("message") or error)[:500])
        if event.get("usage"):
            self.usage = event["usage"]
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise BadStream("bad_stream", "a chunk without a `choices` list")
        if not choices:
            return  # the trailing usage chunk carries no token, so it does not move the end time
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content")
        if text:
            if self._last_text_at is None:
                self.ttft_ms = (now - self.sent_at) * 1000
            else:
                self.itl_ms.append((now - self._last_text_at) * 1000)
            self._last_text_at = now
            self.text_chunks += 1
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        self._last_chunk_at = now

    def finish(self, record: RequestRecord) -> RequestRecord:
        """Fill `record` from a stream that ended; BadStream if it ended before [DONE]. An answer without text
        (the model stopped at once) is a success without TTFT."""
        if self._buffer.strip():
            self._line(self._buffer.strip(), self._last_chunk_at)
            self._buffer = b""
        if not self.done:
            raise BadStream("bad_stream", "the stream ended before `data: [DONE]`")
        usage = self.usage or {}
        record.ok = True
        record.ttft_ms, record.itl_ms = self.ttft_ms, self.itl_ms
        record.e2e_ms = (self._last_chunk_at - self.sent_at) * 1000
        record.finish_reason = self.finish_reason
        record.prompt_tokens = usage.get("prompt_tokens")
        if isinstance(usage.get("completion_tokens"), int):
            record.completion_tokens, record.tokens_from = usage["completion_tokens"], "usage"
        else:
            record.completion_tokens, record.tokens_from = self.text_chunks, "chunks"
        return record


def classify_exception(e: BaseException) -> tuple[str, str]:
    """(error_type, message) for what the HTTP client raised while sending or reading."""
    import requests
    import urllib3.exceptions

    cause = e.args[0] if isinstance(e, requests.exceptions.ConnectionError) and e.args else None
    # requests reports some timeouts as a ConnectionError wrapping urllib3's timeout error.
    timeouts = (urllib3.exceptions.TimeoutError, requests.exceptions.Timeout, TimeoutError)
    if isinstance(e, timeouts) or isinstance(cause, timeouts):
        return "timeout", str(e)[:500]
    if isinstance(e, BadStream):
        return e.error_type, str(e)
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                      urllib3.exceptions.HTTPError, ConnectionError, OSError)):
        return "connection", str(e)[:500]
    return type(e).__name__, str(e)[:500]


def http_error_message(status: int, body: bytes | str) -> str:
    """The OpenAI error shape's message when there is one, else the start of the body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"HTTP {status}: {error['message']}"[:500]
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {text[:300]}"
