"""Serving a trained model over HTTP: OpenAI's completions API with dynamic batching, and a classifier endpoint.

::

    python -m minillm serve --run runs/shakespeare-char          # listens on http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "shakespeare-char", "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}'

Endpoints (FastAPI on uvicorn: no hand-written HTTP):

- ``POST /v1/completions`` (a GPT run): the request and response of OpenAI's completions API (``model``,
  ``prompt`` as a string, a list of strings, a list of token ids or a list of those, ``max_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream`` with ``stream_options.include_usage``), so the
  official ``openai`` client and curl work unchanged. ``stream: true`` sends server-sent events, one
  ``data: {...}`` chunk (a ``text_completion`` object) per piece of text, ending with ``data: [DONE]``.
- ``POST /v1/classify`` (a fine-tuned classifier run): ``{"texts": [...]}`` -> a label and the probability of
  every label, per text.
- ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``.

How a completion is served:

1. The event loop (uvicorn's one thread) parses and checks the request, tokenizes the prompts, and puts one
   :class:`~minillm.batched_generation.Row` per prompt in the worker's waiting line. It never runs the model.
2. One worker thread owns the model (:class:`CompletionWorker`). When idle, it waits for a request, then up
   to ``batch_window_ms`` for others to arrive (or until ``max_batch`` wait): **dynamic batching**. It prefills
   them together and decodes them together, one token per row per step, with the KV cache. Requests that
   arrive while a batch runs join it at the next step, and finished rows leave at once (continuous
   batching, :mod:`minillm.batched_generation`). ``max_batch=1`` serves one request at a time.
3. After each step, each row's new token becomes text (:class:`CompletionText`: stop strings cut it, a
   partial stop string is held back) and goes to the request's own asyncio queue
   (``loop.call_soon_threadsafe``); the handler sends it on, streamed or at the end.
4. A client that disconnects cancels its request: the worker drops its rows before its next step, so the
   slot is free for the next request (for streams, Starlette cancels the response when the client goes; a
   non-streamed request watches for the disconnect while it waits).

Bad input gets a 4xx JSON error in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and
the server stays up. The server binds to loopback unless told otherwise, reads no paths from requests, and
bounds every request (body size, prompts per request, tokens, texts) and its waiting line (503 when full).
:func:`start_server` runs one in-process on a free loopback port, for the chapter and the tests.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations (``request: Request``) at
# run time, and the handlers' imports are local to create_app, so that importing this module does not import FastAPI.

import asyncio
import collections
import dataclasses
import ipaddress
import json
import logging
import pathlib
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from minillm import MinillmError
from minillm.batched_generation import BatchedDecoder, Row, SamplingParams
from minillm.config import QuickConfig
from minillm.finetune import encode_for_bert
from minillm.gpt import GPT
from minillm.inference_runs import classifier_shape, load_for_inference
from minillm.quantization import quantize_model
from minillm.tokenization import UnknownCharacterError, encode_ids, special_token_ids, tokenizer_size

log = logging.getLogger("minillm.serving")

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a context; refuses floods early
DEFAULT_MAX_TOKENS = 16  # OpenAI's default when a request names none
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


@dataclass
class ServingConfig(QuickConfig):
    """How the server listens, batches and bounds requests (``python -m minillm serve`` adds the run to serve)."""

    host: str = field(default=LOOPBACK, metadata={"help": "address to listen on; the default answers this machine only "
                                                          "(the server has no authentication)"})
    port: int = field(default=8000, metadata={"help": "port to listen on (0: any free port)"})
    max_batch: int = field(default=16, metadata={"help": "most sequences decoded together (1: no batching, one request "
                                                         "at a time)"})
    batch_window_ms: float = field(default=5.0, metadata={"help": "how long an idle server waits for more requests to "
                                                                  "batch with the first one"})
    max_tokens: int = field(default=0, metadata={"help": "the most tokens one completion may ask for (0: the model's "
                                                         "context)"})
    max_prompts: int = field(default=16, metadata={"help": "the most prompts in one completions request"})
    max_texts: int = field(default=64, metadata={"help": "the most texts in one classify request"})
    max_waiting: int = field(default=256, metadata={"help": "prompts or texts waiting for the model beyond which new "
                                                            "requests get 503"})
    model_name: str = field(default="", metadata={"help": "the model id clients ask for (default: the run folder's name)"})

    def validate(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_prompts", "max_texts", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens < 0:
            raise ValueError(f"--max-tokens must be 0 (the model's context) or more, got {self.max_tokens}")
        if not 0 <= self.batch_window_ms <= 10_000:
            raise ValueError(f"--batch-window-ms must be in 0..10000, got {self.batch_window_ms}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only ever means this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(error: ValidationError) -> APIError:
    """pydantic's complaint about a request body as one OpenAI-style sentence naming the parameter."""
    first = error.errors()[0]
    kind, loc = first["type"], [str(part) for part in first["loc"]]
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({first['msg']}).")
    if kind in ("model_type", "dict_type") and not loc:
        return APIError(400, "The request body must be a JSON object.")
    param = loc[0] if loc else None
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param)
    if param == "prompt":
        return APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                             "of token ids.", param)
    if param == "texts":
        return APIError(400, "'texts' must be a list of strings.", param)
    return APIError(400, f"Invalid value for '{'.'.join(loc)}': {first['msg'].lower()}.", param)


# ---------------------------------------------------------------------------------------------
# Request bodies (checked by pydantic, strictly: "5" is not a number, true is not 1)
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted, nothing to obfuscate


class CompletionRequest(_Strict):
    """OpenAI's completions request; the parameters this server cannot honour must keep their defaults."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # not supported here: accepted only at their defaults
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ClassifyRequest(_Strict):
    texts: list[str]
    model: str | None = None


# ---------------------------------------------------------------------------------------------
# The model being served
# ---------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """A model with its tokenizer, as the server sees it: a GPT (completions) or a classifier (classify)."""

    name: str
    model: nn.Module
    tokenizer: Any
    labels: list[str] = field(default_factory=list)  # a classifier's label names, by label id
    max_length: int = 0  # a classifier's most input tokens ([CLS] and [SEP] included)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> Literal["completions", "classifier"]:
        return "completions" if isinstance(self.model, GPT) else "classifier"

    @property
    def context(self) -> int:
        return self.model.config.block_size if self.kind == "completions" else self.max_length


def label_names(num_labels: int, run_config: dict | None = None) -> list[str]:
    """The run's own label names if config.json records them, else SST-2's and IMDB's (0 negative, 1 positive:
    the tasks minillm fine-tunes on) for two labels, else the ids as strings."""
    named = (run_config or {}).get("model", {}).get("labels")
    if isinstance(named, list) and len(named) == num_labels and all(isinstance(n, str) for n in named):
        return list(named)
    return ["negative", "positive"] if num_labels == 2 else [str(index) for index in range(num_labels)]


def served_model(model: nn.Module, tokenizer, name: str, run_config: dict | None = None) -> ServedModel:
    """Wrap an in-memory GPT or classifier (with its tokenizer) for :func:`create_app`."""
    model.eval()
    if isinstance(model, GPT):
        return ServedModel(name, model, tokenizer)
    num_labels, max_len, prompt_tokens = classifier_shape(model)
    trained_length = (run_config or {}).get("train_config", {}).get("max_length") or max_len
    return ServedModel(name, model, tokenizer, label_names(num_labels, run_config),
                       max_length=min(int(trained_length), max_len - prompt_tokens))


def load_served_model(run: str | pathlib.Path, device="cpu", quantize: str | None = None, name: str = "") -> ServedModel:
    """The run folder's model and tokenizer (:func:`minillm.inference_runs.load_for_inference`: a GPT run or a
    fine-tuned classifier run), ready to serve. ``quantize="int8"`` serves an int8 copy
    (:func:`minillm.quantization.quantize_model`: every plain linear layer int8 with per-token activations; the
    embeddings, LayerNorms and a tied output layer stay float32)."""
    if quantize not in (None, "", "none", "int8"):
        raise MinillmError(f"--quantize must be int8 or none, got {quantize!r}")
    folder = pathlib.Path(run)
    model, tokenizer, config = load_for_inference(folder, device)
    if not isinstance(model, GPT) and not hasattr(getattr(model, "model", model), "num_labels"):
        raise MinillmError(f"{folder} holds a {config.get('model', {}).get('type')!r} model: serve takes a GPT run "
                           "('pretrain gpt') or a fine-tuned classifier run ('finetune')")
    if quantize == "int8":
        model = quantize_model(model)  # the int8 model of chapter 12's size / accuracy / latency table
    return served_model(model, tokenizer, name or folder.resolve().name, config)


def end_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids that end a text in this tokenizer's training streams (``[SEP]`` after each review for a GPT trained with
    a WordPiece tokenizer, ``<|endoftext|>`` for a byte-level BPE): sampling one ends a completion (``stop``)."""
    if hasattr(tokenizer, "token_to_id"):
        ids = [tokenizer.token_to_id(token) for token in ("[SEP]", "<|endoftext|>")]
    else:
        ids = [getattr(tokenizer, "special_tokens", {}).get("<|endoftext|>")]
    return tuple(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# The text of a completion, token by token
# ---------------------------------------------------------------------------------------------


class CompletionText:
    """The text of one completion as its tokens arrive: what may be sent so far, and where a stop string ends it.

    The text is decoded from all tokens each time (a byte-level BPE token may be half a character; a
    WordPiece ``##`` piece joins the word before it). Held back until more text decides: a tail that
    could be the start of a stop string, and a trailing U+FFFD (a character whose bytes have not all
    arrived). The pieces handed out concatenate to the final text, streamed or not.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        """Take one token; return the new text that is safe to send ('' if none)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped = True
            return self._advance(text[:min(cuts)])
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        safe = text[:len(text) - hold]
        return self._advance(safe.rstrip("\ufffd") if safe.endswith("\ufffd") else safe)

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        return "" if self.stopped else self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # a decoding that rewrote earlier text: hold until it agrees again
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


# ---------------------------------------------------------------------------------------------
# Requests inside the server, and the workers that run the model
# ---------------------------------------------------------------------------------------------


class ServerBusy(Exception):
    """The waiting line is full."""


class Choice(Row):
    """One prompt of a completions request: a :class:`~minillm.batched_generation.Row` that knows its request
    (``owner``), its place in the request's ``choices`` (``index``) and its text so far."""

    def __init__(self, prompt: list[int], params: SamplingParams, job: "Job", index: int, text: CompletionText):
        super().__init__(prompt, params, owner=job)
        self.index, self.text = index, text


class Job:
    """One HTTP request inside the server: its results go to an asyncio queue on the event loop's thread.

    Events: ``("text", index, piece)``, ``("end", index, finish_reason, completion_tokens)`` for completions,
    ``("result", index, probabilities)`` for classification, ``("error", message)``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, parts: int, streaming: bool = False):
        self.loop, self.parts = loop, parts
        self.streaming = streaming  # text as it comes; otherwise each choice's whole text when it ends
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # the client went away: the worker drops this job's rows

    def emit(self, *event) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True


class Worker:
    """A thread that owns the model and runs waiting items in batches: the waiting line, the batching window, the
    counts of what ran. :class:`CompletionWorker` and :class:`ClassifierWorker` say what one batch does."""

    def __init__(self, max_batch: int, batch_window_s: float, max_waiting: int):
        self.max_batch, self.batch_window_s, self.max_waiting = max_batch, batch_window_s, max_waiting
        self.waiting: collections.deque = collections.deque()  # items (rows, texts), each with an .owner Job
        self.condition = threading.Condition()
        self.batch_sizes: collections.Counter = collections.Counter()  # model calls by how many items they ran
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"minillm-{type(self).__name__}", daemon=True)

    @property
    def active(self) -> int:
        """Items the model is working on now (a running row holds its slot until it finishes or is cancelled)."""
        return 0

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, items: list) -> None:
        with self.condition:
            if self.stopping:
                raise ServerBusy("the server is shutting down")
            if len(self.waiting) + len(items) > self.max_waiting:
                raise ServerBusy(f"{len(self.waiting)} prompts or texts are already waiting")
            self.waiting.extend(items)
            self.condition.notify()

    def take(self, running: int) -> list | None:
        """The next items to run, beside ``running`` already running. With nothing running, wait for a first
        item, then up to the batching window for more (or until ``max_batch`` wait); with a batch running,
        whatever is waiting, without waiting. None when the worker is stopping."""
        with self.condition:
            if not running:
                while not self.stopping and not self.waiting:
                    self.condition.wait()
                deadline = time.monotonic() + self.batch_window_s
                while not self.stopping and len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                    self.condition.wait(deadline - time.monotonic())
            if self.stopping:
                return None
            taken = []
            while self.waiting and running + len(taken) < self.max_batch:
                item = self.waiting.popleft()
                if not item.owner.cancelled:
                    taken.append(item)
            return taken

    def _run(self) -> None:
        raise NotImplementedError


class CompletionWorker(Worker):
    """Decodes every running completion one token per step (:class:`~minillm.batched_generation.BatchedDecoder`)
    and hands each row's new text to its request."""

    def __init__(self, served: ServedModel, max_batch: int, batch_window_s: float, max_waiting: int):
        super().__init__(max_batch, batch_window_s, max_waiting)
        self.model = served.model
        self.decoder = BatchedDecoder(served.model)
        self.prefill_sizes: collections.Counter = collections.Counter()  # prefills by how many prompts they ran
        self.cancelled_rows = 0  # rows dropped before their end because their client went away

    @property
    def active(self) -> int:
        return len(self.decoder.rows)

    def _run(self) -> None:
        while True:
            cancelled = [row for row in self.decoder.rows if row.owner.cancelled]  # their clients went away
            self.decoder.remove(cancelled, "cancelled")
            self.cancelled_rows += len(cancelled)
            taken = self.take(len(self.decoder))
            if taken is None:
                break
            try:
                if taken:
                    self.decoder.add(taken)
                    self.prefill_sizes[len(taken)] += 1
                    self._deliver(taken)
                if self.decoder.rows:
                    self.batch_sizes[len(self.decoder)] += 1
                    self._deliver(self.decoder.step())
            except Exception as error:  # a bug or out of memory: fail these requests, keep serving
                log.exception("the completion worker failed")
                for row in {id(row): row for row in [*self.decoder.rows, *taken]}.values():
                    row.owner.emit("error", f"the model failed: {type(error).__name__}")
                self.decoder = BatchedDecoder(self.model)
        for row in [*self.decoder.rows, *self.waiting]:
            row.owner.emit("error", "the server is shutting down")

    def _deliver(self, rows: list[Choice]) -> None:
        """Each row's newest token as text to its request; rows a stop string ended leave the batch."""
        for row in rows:
            job, index, text = row.owner, row.index, row.text
            piece = text.add(row.tokens[-1])
            if text.stopped:
                if not row.done:
                    self.decoder.remove([row], "stop")
                row.finish_reason = "stop"
            if row.done:
                piece += text.finish()
            if job.streaming and piece:
                job.emit("text", index, piece)
            if row.done:
                if not job.streaming and text.sent:
                    job.emit("text", index, text.sent)  # one event for the whole text: less work for the event loop
                job.emit("end", index, row.finish_reason, len(row.tokens))


@dataclass
class ClassifyItem:
    ids: list[int]  # [CLS] text [SEP]
    owner: Job
    index: int


class ClassifierWorker(Worker):
    """Runs waiting texts through the classifier, up to ``max_batch`` texts per forward pass."""

    def __init__(self, served: ServedModel, max_batch: int, batch_window_s: float, max_waiting: int):
        super().__init__(max_batch, batch_window_s, max_waiting)
        self.model = served.model
        self.pad_id = special_token_ids(served.tokenizer).pad
        self.device = next(served.model.parameters()).device

    @torch.no_grad()
    def classify(self, sequences: list[list[int]]) -> torch.Tensor:
        """Label probabilities (B, num_labels) of token-id sequences, right-padded into one batch."""
        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long, device=self.device)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # 1 = a real token
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        logits = self.model(input_ids, attention_mask=attention_mask).logits  # (B, num_labels)
        return torch.softmax(logits.float(), dim=-1)

    def _run(self) -> None:
        while True:
            taken = self.take(0)
            if taken is None:
                break
            if not taken:
                continue
            try:
                self.batch_sizes[len(taken)] += 1
                probabilities = self.classify([item.ids for item in taken]).tolist()
                for item, probs in zip(taken, probabilities):
                    item.owner.emit("result", item.index, probs)
            except Exception as error:
                log.exception("the classifier worker failed")
                for item in taken:
                    item.owner.emit("error", f"the model failed: {type(error).__name__}")
        for item in self.waiting:
            item.owner.emit("error", "the server is shutting down")


# ---------------------------------------------------------------------------------------------
# The HTTP application
# ---------------------------------------------------------------------------------------------


def _json_response(body: dict, status: int = 200):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused (413) before anything parses it."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = _json_response(error_body(f"The request body is larger than {self.max_bytes:,} bytes."), 413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise APIError(413, f"The request body is larger than {self.max_bytes:,} bytes.")
            return message

        return await self.app(scope, limited_receive, send)


def create_app(served: ServedModel, config: ServingConfig | None = None):
    """The FastAPI application serving ``served``; its worker thread starts and stops with the application
    (``app.state.worker``: its ``active``, ``batch_sizes`` and waiting line are what the tests and /health read)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    config = config or ServingConfig()
    worker_class = CompletionWorker if served.kind == "completions" else ClassifierWorker
    worker = worker_class(served, config.max_batch, config.batch_window_ms / 1000, config.max_waiting)
    token_limit = min(config.max_tokens or served.context, served.context)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="minillm", description=f"Serving {served.name} ({served.kind})", lifespan=lifespan)
    app.state.worker, app.state.served = worker, served
    app.add_middleware(BodySizeLimit)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return _json_response(error.body(), error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError):
        return _json_response(error_body("Invalid request: " + "; ".join(e["msg"] for e in error.errors())), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"Unknown request URL: {request.method} {request.url.path}." if error.status_code == 404 else str(error.detail)
        return _json_response(error_body(message, kind), error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        log.exception("a request failed")
        return _json_response(error_body(f"The server had an error ({type(error).__name__}).", "server_error"), 500)

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "minillm"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "kind": served.kind, "active": worker.active,
                "waiting": len(worker.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != served.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{served.name}`.", "model",
                           "model_not_found")

    def check_kind(kind: str, endpoint: str) -> None:
        if served.kind != kind:
            other = "/v1/completions" if served.kind == "completions" else "/v1/classify"
            raise APIError(404, f"{served.name} is a {'GPT' if served.kind == 'completions' else 'classifier'}: it "
                                f"serves {other}, not {endpoint}.", "model", "model_not_supported")

    async def parse(request: Request, schema: type[BaseModel]):
        try:
            return schema.model_validate_json(await request.body())
        except ValidationError as error:
            raise validation_error(error) from None

    def submit(items: list) -> None:
        try:
            worker.submit(items)
        except ServerBusy as busy:
            raise APIError(503, f"The server is busy ({busy}); try again shortly.", type="server_error",
                           code="server_busy") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_kind("completions", "/v1/completions")
        body = await parse(request, CompletionRequest)
        check_model(body.model)
        prompts, params, stop = completion_inputs(body, served, token_limit, config.max_prompts)
        job = Job(asyncio.get_running_loop(), len(prompts), streaming=bool(body.stream))
        submit([Choice(ids, params, job, index, CompletionText(served.tokenizer, stop)) for index, ids in enumerate(prompts)])
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                 "model": served.name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_completion(job, reply, prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, finish_reasons, completion_tokens = [""] * len(prompts), [None] * len(prompts), 0
        async for event in job_events(job, request):
            if event[0] == "text":
                texts[event[1]] += event[2]
            else:
                finish_reasons[event[1]], completion_tokens = event[2], completion_tokens + event[3]
        choices = [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}
                   for index, (text, reason) in enumerate(zip(texts, finish_reasons))]
        return {**reply, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def stream_completion(job: Job, reply: dict, prompt_tokens: int, include_usage: bool):
        """Server-sent events: a text_completion chunk per piece of text, a last chunk per choice with its
        finish_reason, the usage chunk if asked for, then [DONE]. Cancelled when the client goes away."""
        extra = {"usage": None} if include_usage else {}
        completion_tokens = 0
        try:
            async for event in job_events(job):
                if event[0] == "text":
                    choice = {"text": event[2], "index": event[1], "logprobs": None, "finish_reason": None}
                else:
                    choice = {"text": "", "index": event[1], "logprobs": None, "finish_reason": event[2]}
                    completion_tokens += event[3]
                yield sse({**reply, "choices": [choice], **extra})
            if include_usage:
                yield sse({**reply, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except APIError as error:  # the model failed mid-stream: an error event, which the openai client raises
            yield sse(error.body())
        finally:
            job.cancel()  # a no-op once every choice has ended; otherwise it frees the job's slots

    @app.post("/v1/classify")
    async def classify(request: Request):
        check_kind("classifier", "/v1/classify")
        body = await parse(request, ClassifyRequest)
        check_model(body.model)
        if not body.texts:
            raise APIError(400, "'texts' must hold at least one text.", "texts")
        if len(body.texts) > config.max_texts:
            raise APIError(400, f"'texts' holds {len(body.texts)} texts; this server takes at most {config.max_texts} "
                                "per request.", "texts")
        encoded = [ids for ids, _ in encode_for_bert(served.tokenizer, [(text, 0) for text in body.texts],
                                                     served.max_length)]
        job = Job(asyncio.get_running_loop(), len(encoded))
        submit([ClassifyItem(ids, job, index) for index, ids in enumerate(encoded)])
        results = [None] * len(encoded)
        async for event in job_events(job, request):
            results[event[1]] = event[2]
        data = []
        for index, probs in enumerate(results):
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": index, "label": served.labels[best], "label_id": best,
                         "probabilities": dict(zip(served.labels, probs))})
        tokens = sum(len(ids) for ids in encoded)
        return {"id": f"clf-{uuid.uuid4().hex}", "object": "classification", "created": int(time.time()),
                "model": served.name, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


async def job_events(job: Job, request=None):
    """A job's events until each of its parts has ended. With ``request`` (not streamed), a client that
    disconnects meanwhile cancels the job; a stream's disconnect cancels the response itself."""
    gone = asyncio.ensure_future(wait_for_disconnect(request)) if request is not None else None
    ended = 0
    try:
        while ended < job.parts:
            get = asyncio.ensure_future(job.queue.get())
            if gone is not None:
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    job.cancel()
                    raise APIError(499, "The client closed the request.")
            event = await get
            if event[0] == "error":
                raise APIError(500, f"The server had an error: {event[1]}.", type="server_error")
            ended += event[0] != "text"
            yield event
    finally:
        if gone is not None:
            gone.cancel()


async def wait_for_disconnect(request) -> None:
    """Returns when the client of ``request`` (whose body has been read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def completion_inputs(body: CompletionRequest, served: ServedModel, token_limit: int,
                      max_prompts: int) -> tuple[list[list[int]], SamplingParams, list[str]]:
    """A completions request checked against the model: (prompts as token ids, sampling, stop strings).
    Raises :class:`APIError` (400) naming the parameter at fault."""
    for name, default in (("n", 1), ("best_of", 1), ("echo", False), ("logprobs", None), ("suffix", None),
                          ("presence_penalty", 0), ("frequency_penalty", 0)):
        value = getattr(body, name)
        if value is not None and value != default:
            raise APIError(400, f"'{name}' is not supported by this server (leave it at {json.dumps(default)}).", name)
    if body.logit_bias:
        raise APIError(400, "'logit_bias' is not supported by this server.", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}.", "max_tokens")
    if max_tokens > token_limit:
        raise APIError(400, f"'max_tokens' is {max_tokens}; this server generates at most {token_limit} tokens per "
                            "completion.", "max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {temperature}.", "temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 <= top_p <= 1:
        raise APIError(400, f"'top_p' must be between 0 and 1, got {top_p}.", "top_p")
    if body.seed is not None and not -2**63 <= body.seed < 2**63:
        raise APIError(400, "'seed' must fit in 64 bits.", "seed")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise APIError(400, f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings.", "stop")
    prompts = prompt_ids(body.prompt, served, max_prompts)
    for ids in prompts:
        if len(ids) + max_tokens > served.context:
            raise APIError(400, f"This model's maximum context length is {served.context} tokens, however you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
                                "completion). Please reduce your prompt or completion length.", "prompt",
                           "context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if top_p == 0 else temperature,
                            top_p=None if top_p >= 1 else top_p, seed=body.seed,
                            stop_token_ids=end_token_ids(served.tokenizer))
    return prompts, params, stop


def prompt_ids(prompt, served: ServedModel, max_prompts: int) -> list[list[int]]:
    """A request's ``prompt`` (a string, strings, token ids, or lists of token ids) as token-id lists."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts:
        raise APIError(400, "'prompt' is empty.", "prompt")
    if len(prompts) > max_prompts:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts; this server takes at most {max_prompts} per "
                            "request.", "prompt")
    vocab = tokenizer_size(served.tokenizer)
    result = []
    for index, item in enumerate(prompts):
        where = "'prompt'" if len(prompts) == 1 else f"prompt {index}"
        if isinstance(item, str):
            try:
                ids = encode_ids(served.tokenizer, item)
            except UnknownCharacterError as error:  # its first clause names the character and where it is
                raise APIError(400, f"{where} cannot be encoded by this model's tokenizer: {str(error).split(';')[0]}.",
                               "prompt",
                               "unencodable_prompt") from None
        else:
            ids = list(item)
            if any(not 0 <= token < vocab for token in ids):
                raise APIError(400, f"{where} holds token ids outside the vocabulary (0 .. {vocab - 1}).", "prompt")
        if not ids:
            raise APIError(400, f"{where} is empty: give at least one character (or token).", "prompt")
        result.append(ids)
    return result


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# Running a server
# ---------------------------------------------------------------------------------------------


class RunningServer:
    """A server running in this process on a loopback port (:func:`start_server`); ``stop()`` or a
    ``with`` block ends it."""

    def __init__(self, app, server, thread: threading.Thread, host: str, port: int):
        self.app, self.server, self.thread, self.host, self.port = app, server, thread, host, port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address goes in brackets
        return f"http://{host}:{self.port}"

    @property
    def worker(self) -> Worker:
        return self.app.state.worker

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(served: ServedModel, config: ServingConfig | None = None, timeout: float = 30.0) -> RunningServer:
    """Serve ``served`` from a thread of this process, on ``config.host`` (a loopback address) and a free port
    (``config.port`` is ignored: the port is the system's choice, so servers never collide). Returns once the
    server accepts connections."""
    import uvicorn

    config = dataclasses.replace(config or ServingConfig(), port=0)
    if not is_loopback(config.host):
        raise MinillmError(f"start_server listens on this machine only (127.0.0.1, ::1), not {config.host!r}: use "
                           "'python -m minillm serve --host ...' to serve other machines")
    app = create_app(served, config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))  # uvicorn closes the socket when it stops
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="minillm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise MinillmError(f"the server did not start on {config.host}:{port} within {timeout:.0f} s")
        time.sleep(0.01)
    return RunningServer(app, server, thread, config.host, port)


def serve(served: ServedModel, config: ServingConfig | None = None) -> None:
    """Serve ``served`` in the foreground until Ctrl-C (what ``python -m minillm serve`` runs)."""
    import uvicorn

    config = config or ServingConfig()
    if not is_loopback(config.host):
        log.warning("listening on %s: anyone who can reach this address can use the model (there is no "
                    "authentication)", config.host)
    uvicorn.run(create_app(served, config), host=config.host, port=config.port, log_level="info")
