"""Locust scenario: OpenAI-style clients streaming chat completions from a mix of models (base and adapters).

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 8 -t 60s \\
        --models cat,dog --include-base --mix zipf:1.1 --max-tokens 64 --records out/requests.jsonl

(`loraplex loadtest` runs exactly this and summarises the records.) Each user sends one streamed
/v1/chat/completions request after another (a closed loop). Locust's own timer stops at the response headers of
a streamed response, so the stream is read and timed here, and reported to locust as entries of their own:

- ``POST <model>``: locust's entry for the request (time to response headers); every failure is reported on it,
  once, with its type: ``http_<status>``, ``timeout``, ``connection``, ``stream_error`` (an error event inside
  the stream), ``bad_stream`` (a broken stream).
- ``TTFT <model>``, ``ITL <model>`` (the request's mean gap between text chunks), ``E2E <model>`` (response
  length = output tokens): successful requests only.

With ``--records FILE`` every request is also written as one JSON line (loraplex.loadtests.workload.RequestRecord)
for exact percentiles. ``--max-requests N`` stops the run after N finished requests; ``--run-time`` bounds it in
time. Every option also reads an environment variable (LORAPLEX_LOADTEST_<OPTION>).
"""

from __future__ import annotations

import json
import logging
import random
import time

import gevent
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

import loraplex.eval.runner  # noqa: F401 - the prompt reader; imported now, before locust's run-time clock starts
from loraplex.errors import LoraplexError
from loraplex.loadtests import workload

logger = logging.getLogger("loraplex.loadtest")


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    def option(name, **kwargs):
        env = "LORAPLEX_LOADTEST_" + name.lstrip("-").upper().replace("-", "_")
        parser.add_argument(name, env_var=env, **kwargs)

    option("--models", default="", help="Comma-separated model names to send requests to. Default: every served model.")
    option("--include-base", action="store_true", default=False, help="Add the served base model to the mix.")
    option("--mix", default="uniform", help="Traffic split over the models: uniform, or zipf:S (first model most popular).")
    option("--data", default="", help=f"JSONL prompts in any training format. Default: {workload.DEFAULT_DATA} if present, "
           "else built-in generic prompts.")
    option("--max-tokens", type=int, default=64, help="max_tokens of every request.")
    option("--api-key", default="", is_secret=True, help="Bearer key, if the server requires one.")
    option("--max-requests", type=int, default=0, help="Stop after this many finished requests (0: no limit).")
    option("--records", default="", help="Write one JSON line per request to this file.")
    option("--request-timeout", type=float, default=120.0, help="Seconds a request may take (connect, each read, and whole answer).")
    option("--allow-remote", action="store_true", default=False, help="Allow a --host that is not a loopback address.")
    option("--seed", type=int, default=0, help="Seed of the model and prompt choices.")


class Plan:
    """Everything the users share during one test: the mix, the prompts, the request budget, the records file."""

    def __init__(self, environment):
        options = environment.parsed_options
        self.environment = environment
        self.root = workload.check_target(environment.host or workload.DEFAULT_BASE_URL, options.allow_remote)
        self.api_key = options.api_key or None
        requested = workload.split_list(options.models)
        if options.include_base or not requested:
            server_models = workload.fetch_server_models(self.root, self.api_key)
        else:
            server_models = [{"id": m} for m in requested]  # taken as given; a wrong name shows as http_404
        self.models = workload.resolve_models(requested, server_models, options.include_base)
        self.weights = workload.mix_weights(self.models, options.mix)
        self.pick_model = workload.ModelPicker(self.weights, options.seed)
        self.prompts = workload.load_prompts(options.data or None)
        self._prompt_rng = random.Random(options.seed + 1)
        self.max_tokens = options.max_tokens
        self.timeout_s = options.request_timeout
        self.max_requests = options.max_requests
        self.started = self.finished = 0
        self.records = open(options.records, "w", encoding="utf-8") if options.records else None
        self.closed = False
        # Users are spawned after test_start: they all send to the checked root (a --host ending in /v1 included).
        ChatUser.host = self.root
        logger.info("models %s, mix %s (weights %s); prompts: %s", self.models, options.mix,
                    {m: round(w, 4) for m, w in self.weights.items()}, self.prompts.source)

    def take_slot(self) -> bool:
        if self.max_requests and self.started >= self.max_requests:
            return False
        self.started += 1
        return True

    def pick_messages(self) -> list[dict]:
        return self._prompt_rng.choice(self.prompts.conversations)

    def record(self, record: workload.RequestRecord) -> None:
        self.finished += 1
        if self.records is not None:
            # One write per line and a flush: a run cut short still leaves whole lines behind.
            self.records.write(json.dumps(record.as_dict()) + "\n")
            self.records.flush()

    def watch_budget(self) -> None:
        """Ends the run once --max-requests requests have finished (ok or not)."""
        while not (self.max_requests and self.finished >= self.max_requests):
            gevent.sleep(0.1)
        logger.info("%d requests finished: stopping", self.finished)
        self.environment.runner.quit()

    def close(self) -> None:
        self.closed = True
        if self.records is not None:
            self.records.close()
            self.records = None


PLAN: Plan | None = None


@events.test_start.add_listener
def _plan(environment, **_kwargs):
    global PLAN
    try:
        PLAN = Plan(environment)
    except LoraplexError as e:
        logger.error("%s", e)
        environment.process_exit_code = 2
        gevent.spawn(environment.runner.quit)  # not from inside this event: quitting fires test_stop
        return
    if PLAN.max_requests:
        gevent.spawn(PLAN.watch_budget)


@events.test_stop.add_listener
def _close(**_kwargs):
    if PLAN is not None:
        PLAN.close()


def _arrivals(response, size: int = 65536):
    """The body's bytes as they arrive. iter_content(n) would wait for n bytes (and, with chunk_size=None, for
    the whole body unless the server uses chunked encoding); read1 returns whatever the socket has."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3: one piece per HTTP chunk, which streaming servers send per event
        yield from response.iter_content(chunk_size=None)
        return
    while data := read1(size, decode_content=True):
        yield data


class ChatUser(HttpUser):
    """One client of an OpenAI-compatible server: streams a chat completion, then sends the next one."""

    host = workload.DEFAULT_BASE_URL
    wait_time = constant(0)

    @task
    def chat(self) -> None:
        plan = PLAN
        if plan is None or plan.closed:
            raise StopUser()  # the plan failed (or the test is over): the runner is quitting
        if not plan.take_slot():
            raise StopUser()  # the request budget is spent; watch_budget ends the run
        model = plan.pick_model()
        body = workload.chat_body(model, plan.pick_messages(), plan.max_tokens)
        headers = {"Accept": "text/event-stream"}
        if plan.api_key:
            headers["Authorization"] = f"Bearer {plan.api_key}"
        record = workload.RequestRecord(model=model, started_at=time.time())
        sent_at = time.perf_counter()
        with self.client.post(workload.CHAT_PATH, json=body, headers=headers, name=model, stream=True,
                              catch_response=True, timeout=(plan.timeout_s, plan.timeout_s)) as response:
            try:
                self._read(response, sent_at, plan.timeout_s, record)
            except Exception as e:  # noqa: BLE001 - every failure becomes a typed, counted error
                record.error_type, record.error_message = workload.classify_exception(e)
            finally:
                if response.raw is not None:
                    response.close()  # an unfinished stream's connection is dropped, not reused
            record.finished_at = time.time()
            if record.ok:
                response.success()
            else:
                response.failure(f"{record.error_type}: {record.error_message}")
        plan.record(record)
        if record.ok:
            self._fire_timings(record)

    @staticmethod
    def _read(response, sent_at: float, timeout_s: float, record: workload.RequestRecord) -> None:
        if response.status_code == 0:  # locust's stand-in response for a request that got no answer
            raise response.error
        record.status_code = response.status_code
        if response.status_code >= 400:
            record.error_type = f"http_{response.status_code}"
            record.error_message = workload.http_error_message(response.status_code, response.content)
            return
        timer = workload.StreamTimer(sent_at)
        for data in _arrivals(response):
            now = time.perf_counter()
            timer.feed(data, now)
            if now - sent_at > timeout_s:
                raise TimeoutError(f"no complete answer within {timeout_s:g} s")
        timer.finish(record)

    def _fire_timings(self, record: workload.RequestRecord) -> None:
        fire = self.environment.events.request.fire
        common = dict(name=record.model, context={}, exception=None, start_time=record.started_at)
        if record.ttft_ms is not None:
            fire(request_type="TTFT", response_time=record.ttft_ms, response_length=0, **common)
        if record.itl_ms:
            fire(request_type="ITL", response_time=sum(record.itl_ms) / len(record.itl_ms),
                 response_length=len(record.itl_ms), **common)
        fire(request_type="E2E", response_time=record.e2e_ms, response_length=record.completion_tokens or 0,
             **common)
