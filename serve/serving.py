"""Chat and text completions on the engine: model resolution (base, adapter or A/B alias), prompt building,
limits, sampling parameters, and the streaming and non-streaming responses.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.errors import LoraplexError
from loraplex.serve import engine as eng
from loraplex.serve.adapters import AdapterManager, AdapterVersion
from loraplex.serve.aliases import Alias
from loraplex.serve.config import ServeConfig
from loraplex.serve.errors import APIError, bad_request, model_not_found, sse_error
from loraplex.serve.metrics import Metrics
from loraplex.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)

log = logging.getLogger("loraplex.serve")

ADAPTER_HEADER = "x-loraplex-adapter"
RETRY_AFTER_S = "1"


@dataclass
class Target:
    """The model that serves one request: the base (version None) or one adapter version."""

    model: str
    version: AdapterVersion | None

    @property
    def lora_request(self):
        return None if self.version is None else self.version.lora_request()


class RequestScope:
    """One admitted generation request: holds its queue slot and adapter lease, records its metrics, and
    gives both back exactly once however the request ends."""

    def __init__(self, serving: "Serving", endpoint: str, slots: int = 1):
        self.serving = serving
        self.endpoint = endpoint
        self.slots = slots
        self.start = time.perf_counter()
        self.target: Target | None = None
        self.first_token_at: float | None = None
        self.status = 200
        self._closed = False
        serving.in_flight += slots
        serving.metrics.in_flight.inc(slots)

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def close(self, prompt_tokens: int = 0, completion_tokens: int = 0, ttft: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        s = self.serving
        s.in_flight -= self.slots
        s.metrics.in_flight.dec(self.slots)
        model = self.target.model if self.target else "-"
        if self.target is not None and self.target.version is not None:
            s.adapters.release(self.target.version)
        s.metrics.requests.labels(model, self.endpoint, str(self.status)).inc()
        if self.status == 200 and self.target is not None:
            s.metrics.prompt_tokens.labels(model).inc(prompt_tokens)
            s.metrics.completion_tokens.labels(model).inc(completion_tokens)
            s.metrics.latency.labels(model, self.endpoint).observe(time.perf_counter() - self.start)
            if ttft is None and self.first_token_at is not None:
                ttft = self.first_token_at - self.start
            if ttft is not None:
                s.metrics.ttft.labels(model).observe(ttft)


class ScopedStream(StreamingResponse):
    """A streaming response that closes its request scope however it ends, also when the client is gone
    before the first chunk (then the body generator never starts, and its own cleanup never runs)."""

    def __init__(self, content, scope: RequestScope, headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.request_scope = scope

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            if self.request_scope.status == 200:
                self.request_scope.status = 499  # the client went away mid-response
            raise
        finally:
            self.request_scope.close()


class Serving:
    def __init__(self, config: ServeConfig, engine, tokenizer, adapters: AdapterManager,
                 aliases: dict[str, Alias], metrics: Metrics):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.aliases = aliases
        self.metrics = metrics
        self.max_model_len = eng.max_model_len(engine)
        self.sampling_defaults = eng.default_sampling(engine)
        self.in_flight = 0
        self.created = int(time.time())
        self._rng = random.Random()
        self.set_aliases(aliases)

    def set_aliases(self, aliases: dict[str, Alias]) -> None:
        if self.config.served_name in aliases:
            raise LoraplexError(f"alias {self.config.served_name!r} has the base model's name",
                                hint="rename the alias in the --aliases file")
        self.aliases = aliases
        self.adapters.reserved_names = {self.config.served_name, *aliases}

    # ---------------------------------------------------------------- models

    async def model_list(self) -> ModelList:
        await self.adapters.scan()
        base = self.config.served_name
        cards = [ModelCard(id=base, created=self.created, root=str(self.config.model_path), kind="base",
                           max_model_len=self.max_model_len)]
        for version in sorted(self.adapters.current.values(), key=lambda v: v.name):
            cards.append(ModelCard(id=version.name, created=int(version.info.created or self.created),
                                   root=str(version.path), parent=base, kind="adapter",
                                   max_model_len=self.max_model_len))
        for alias in self.aliases.values():
            cards.append(ModelCard(id=alias.name, created=self.created, parent=base, kind="alias",
                                   aliases_to=alias.weights(), max_model_len=self.max_model_len))
        return ModelList(data=cards)

    async def resolve(self, model: str, user: str | None) -> Target:
        """Base, adapter or alias -> the target serving this request (its adapter leased until release)."""
        name = model
        alias = self.aliases.get(model)
        if alias is not None:
            name = alias.pick(user, self._rng)
        if name == self.config.served_name:
            return Target(name, None)
        try:
            version = await self.adapters.resolve(name)
        except APIError as e:
            if alias is not None and e.status == 404:
                raise model_not_found(model, f"alias {model!r} chose {name!r}, which is not available") from None
            raise
        self.adapters.acquire(version)
        return Target(name, version)

    # ---------------------------------------------------------------- admission and limits

    def admit(self, endpoint: str, slots: int = 1) -> RequestScope:
        """A queue slot per prompt; refused with 429 beyond --max-queue (a lone request always gets in)."""
        if self.in_flight and self.in_flight + slots > self.config.max_queue:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at its limit of {self.config.max_queue} requests in flight; "
                                "retry shortly", code="server_overloaded", headers={"Retry-After": RETRY_AFTER_S})
        if eng.engine_errored(self.engine):
            raise engine_unavailable()
        return RequestScope(self, endpoint, slots)

    def max_tokens_for(self, requested: int | None, prompt_len: int, param: str, prompt_param: str) -> int:
        limit = self.config.max_tokens_limit
        if requested is not None and requested > limit:
            raise bad_request(f"{param}={requested} is above this server's limit of {limit}", param)
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"the prompt is {prompt_len} tokens long; this model's context is "
                                f"{self.max_model_len} tokens", param=prompt_param, code="context_length_exceeded")
        room = self.max_model_len - prompt_len
        if requested is None:
            return min(self.config.default_max_tokens, room)
        if requested > room:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus {param}={requested} exceed this model's "
                                f"context of {self.max_model_len} tokens", param=param,
                           code="context_length_exceeded")
        return requested

    def sampling_params(self, request, max_tokens: int, stream: bool):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        # Unset fields take the model's generation_config defaults, then OpenAI's.
        defaults = self.sampling_defaults
        fields = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        values = {name: getattr(request, name) if getattr(request, name) is not None else defaults.get(name, default)
                  for name, default in fields.items()}
        extra = {k: defaults[k] for k in ("top_k", "min_p", "repetition_penalty") if k in defaults}
        try:
            return SamplingParams(
                n=request.n, max_tokens=max_tokens, stop=request.stop_list() or None, seed=request.seed,
                ignore_eos=request.ignore_eos, min_tokens=request.min_tokens,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
                **values, **extra,
            )
        except Exception as e:  # vLLM's own checks (e.g. n > 1 with temperature 0): ValueError or its own type
            raise bad_request(str(e), getattr(e, "parameter", None) or _param_named_in(str(e))) from None

    # ---------------------------------------------------------------- prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("the base model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template raises jinja errors for conversations it does not accept
            raise bad_request(f"the chat template rejected these messages: {e}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompts = []
        vocab = len(self.tokenizer)
        for i, prompt in enumerate(request.prompts()):
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)  # with BOS where the model uses one, as for any raw prompt
                if not ids:
                    raise bad_request("prompt must not be empty", "prompt")
            else:
                if max(prompt) >= vocab:
                    raise bad_request(f"prompt[{i}] has a token id {max(prompt)} outside the vocabulary "
                                      f"(size {vocab})", "prompt")
                ids = prompt
            prompts.append(ids)
        return prompts

    # ---------------------------------------------------------------- endpoints

    async def chat(self, request: ChatCompletionRequest, raw: Request):
        check_supported(request)
        target = await self.resolve(request.model, request.user)
        try:
            prompt_ids = self.chat_prompt(request)
            param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            max_tokens = self.max_tokens_for(request.requested_max_tokens(), len(prompt_ids), param, "messages")
            params = self.sampling_params(request, max_tokens, request.stream)
            scope = self.admit("chat")
        except BaseException:
            self._release(target)
            raise
        scope.target = target
        request_id = new_id("chatcmpl")
        headers = {ADAPTER_HEADER: target.model}
        outputs = self._generate([prompt_ids], params, request_id, target)
        if request.stream:
            return ScopedStream(self._chat_stream(request, scope, outputs, request_id), scope, headers)
        return JSONResponse(await self._chat_full(request, scope, outputs, request_id), headers=headers)

    async def completion(self, request: CompletionRequest, raw: Request):
        check_supported(request)
        target = await self.resolve(request.model, request.user)
        try:
            prompts = self.completion_prompts(request)
            requested = request.requested_max_tokens()
            max_tokens = min(self.max_tokens_for(requested, len(p), "max_tokens", "prompt") for p in prompts)
            params = self.sampling_params(request, max_tokens, request.stream)
            scope = self.admit("completions", slots=len(prompts))
        except BaseException:
            self._release(target)
            raise
        scope.target = target
        request_id = new_id("cmpl")
        headers = {ADAPTER_HEADER: target.model}
        echoes = [self.tokenizer.decode(p) if request.echo else "" for p in prompts]
        outputs = self._generate(prompts, params, request_id, target)
        if request.stream:
            return ScopedStream(self._completion_stream(request, scope, outputs, request_id, echoes), scope,
                                headers)
        return JSONResponse(await self._completion_full(request, scope, outputs, request_id, echoes),
                            headers=headers)

    def _release(self, target: Target) -> None:
        if target.version is not None:
            self.adapters.release(target.version)

    # ---------------------------------------------------------------- engine

    def _generate(self, prompts: list[list[int]], params, request_id: str, target: Target) -> AsyncIterator:
        """(prompt index, RequestOutput) pairs from the engine for every prompt. Cancelling the consumer
        (a client that went away) aborts the requests inside the engine."""
        lora = target.lora_request
        gens = [self.engine.generate({"type": "token", "prompt_token_ids": ids}, params, f"{request_id}-{i}",
                                     lora_request=lora)
                for i, ids in enumerate(prompts)]
        return _indexed(gens[0]) if len(gens) == 1 else _merge(gens)

    def _client_went_away(self, scope: RequestScope) -> None:
        scope.status = 499  # nginx's "client closed request": the request was aborted in the engine
        self.metrics.aborted.labels(scope.target.model).inc()

    def _generation_failed(self, scope: RequestScope, e: Exception) -> APIError:
        error = generation_error(e)
        scope.status = error.status
        return error

    async def _collect(self, scope: RequestScope, outputs: AsyncIterator):
        """Final outputs per prompt for a non-streaming request; errors become APIErrors."""
        finals = {}
        try:
            async for index, out in outputs:
                finals[index] = out
        except asyncio.CancelledError:
            self._client_went_away(scope)
            raise
        except Exception as e:
            raise self._generation_failed(scope, e) from None
        finally:
            await outputs.aclose()
        return [finals[i] for i in sorted(finals)]

    # ---------------------------------------------------------------- chat responses

    async def _chat_full(self, request, scope, outputs, request_id) -> dict:
        try:
            (final,) = await self._collect(scope, outputs)
            choices = [ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                                  finish_reason=o.finish_reason) for o in sorted(final.outputs, key=_index)]
            usage = _usage([final])
            scope.close(usage.prompt_tokens, usage.completion_tokens, ttft=_engine_ttft(final))
            return ChatCompletionResponse(id=request_id, model=scope.target.model, choices=choices,
                                          usage=usage).model_dump(mode="json")
        finally:
            scope.close()

    def _chat_stream(self, request, scope, outputs, request_id) -> AsyncIterator[str]:
        def chunks(p: int, step: list) -> list[list[ChatChunkChoice]]:
            # a choice's first chunk carries only its role, as OpenAI's do
            out = [[ChatChunkChoice(index=o.index, delta=ChatDelta(role="assistant", content=""))]
                   for o, first in step if first]
            content = [ChatChunkChoice(index=o.index, delta=ChatDelta(content=o.text), finish_reason=o.finish_reason)
                       for o, _ in step if o.text or o.finish_reason]
            return out + [content] if content else out

        return self._stream(request, scope, outputs, request_id, ChatCompletionChunk, chunks)

    # ---------------------------------------------------------------- completion responses

    async def _completion_full(self, request, scope, outputs, request_id, echoes) -> dict:
        try:
            finals = await self._collect(scope, outputs)
            choices = [CompletionChoice(index=p * request.n + o.index, text=echoes[p] + o.text,
                                        finish_reason=o.finish_reason)
                       for p, final in enumerate(finals) for o in sorted(final.outputs, key=_index)]
            usage = _usage(finals)
            scope.close(usage.prompt_tokens, usage.completion_tokens, ttft=_engine_ttft(finals[0]))
            return CompletionResponse(id=request_id, model=scope.target.model, choices=choices,
                                      usage=usage).model_dump(mode="json")
        finally:
            scope.close()

    def _completion_stream(self, request, scope, outputs, request_id, echoes) -> AsyncIterator[str]:
        def chunks(p: int, step: list) -> list[list[CompletionChoice]]:
            texts = [(o, echoes[p] + o.text if first else o.text) for o, first in step]  # echo once per choice
            choices = [CompletionChoice(index=p * request.n + o.index, text=text, finish_reason=o.finish_reason)
                       for o, text in texts if text or o.finish_reason]
            return [choices] if choices else []

        return self._stream(request, scope, outputs, request_id, CompletionResponse, chunks)

    # ---------------------------------------------------------------- streaming

    async def _stream(self, request, scope, outputs, request_id, body_type, chunks) -> AsyncIterator[str]:
        """A streamed response: `chunks(prompt index, step)` turns each engine step into the choices of zero or
        more chunks; a usage chunk when the client asked for it, then `[DONE]`. An error while generating becomes
        one OpenAI-shaped error event (the status line is long gone); a client that goes away aborts the request
        in the engine; the request's tokens are recorded however it ends."""
        include_usage = request.include_usage()
        chunk = _chunk_writer(body_type, request_id, scope.target.model, include_usage)
        tokens = _TokenCount()
        steps = _stream_steps(outputs, scope, tokens)
        try:
            async for p, step in steps:
                for choices in chunks(p, step):
                    yield chunk(choices)
            if include_usage:
                yield chunk([], tokens.usage())
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self._client_went_away(scope)
            raise
        except Exception as e:
            yield sse_error(self._generation_failed(scope, e))
            yield "data: [DONE]\n\n"
        finally:
            await steps.aclose()
            await outputs.aclose()
            usage = tokens.usage()
            scope.close(usage.prompt_tokens, usage.completion_tokens)


def _chunk_writer(body_type, request_id: str, model: str, include_usage: bool):
    """One SSE event per chunk of a stream: same id, creation time and model in every chunk, `usage` only when
    the client asked for it (stream_options.include_usage)."""
    created = int(time.time())

    def chunk(choices, usage=None) -> str:
        body = body_type(id=request_id, created=created, model=model, choices=choices, usage=usage)
        return f"data: {body.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"

    return chunk


@dataclass
class _TokenCount:
    """Tokens of one streamed request so far: prompt tokens per prompt, generated tokens in all."""
    prompt: dict[int, int] = field(default_factory=dict)
    completion: int = 0

    def usage(self) -> Usage:
        prompt = sum(self.prompt.values())
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion, total_tokens=prompt + self.completion)


async def _stream_steps(outputs: AsyncIterator, scope, tokens: _TokenCount) -> AsyncIterator:
    """The engine's streamed outputs as (prompt index, [(output, first output of its choice)]) per step, with
    the request's token counts and first-token time kept up to date: what both streaming endpoints share."""
    seen: set[tuple[int, int]] = set()
    async for p, out in outputs:
        if out.prompt_token_ids is not None:
            tokens.prompt[p] = len(out.prompt_token_ids)
        step = []
        for o in out.outputs:
            if o.token_ids:
                scope.first_token()
            tokens.completion += len(o.token_ids)
            step.append((o, (p, o.index) not in seen))
            seen.add((p, o.index))
        yield p, step


# ---------------------------------------------------------------- helpers

def check_supported(request) -> None:
    field = request.unsupported_field()
    if field is not None:
        raise bad_request(f"{field} is not supported by this server", field, code="unsupported_parameter")


def engine_unavailable() -> APIError:
    return APIError(503, "the inference engine has stopped; the server cannot generate until it is restarted",
                    code="engine_unavailable")


def generation_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if eng.is_engine_dead(error):
        return engine_unavailable()
    if type(error).__name__ == "VLLMValidationError":  # vllm.exceptions, in newer vLLM releases only
        return bad_request(str(error), getattr(error, "parameter", None))
    log.exception("generation failed", exc_info=error)
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", code="generation_failed")


def _param_named_in(message: str) -> str | None:
    """The request field an engine error message starts with ("n must be 1 ..." -> "n"), if any."""
    first = message.split(" ", 1)[0]
    return first if first in ChatCompletionRequest.model_fields else None


def _usage(finals) -> Usage:
    prompt = sum(len(f.prompt_token_ids or ()) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _engine_ttft(final) -> float | None:
    latency = getattr(getattr(final, "metrics", None), "first_token_latency", None)
    return latency or None


def _index(output) -> int:
    return output.index


async def _indexed(gen) -> AsyncIterator:
    try:
        async for out in gen:
            yield 0, out
    finally:
        await gen.aclose()  # aborts the request in the engine if it has not finished


async def _merge(gens: list[AsyncIterator]) -> AsyncIterator:
    """Interleave several engine streams as (index, output); closing it cancels (and so aborts) them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, gen: AsyncIterator) -> None:
        try:
            async for out in gen:
                queue.put_nowait((index, out, None))
        except Exception as e:
            queue.put_nowait((index, None, e))
        finally:
            queue.put_nowait((index, done, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out, error = await queue.get()
            if error is not None:
                raise error
            if out is done:
                remaining -= 1
                continue
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
