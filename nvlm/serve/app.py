"""The FastAPI app: ``POST /v1/chat/completions`` (plain or streamed), ``GET /v1/models``, ``GET /health``.

Requests are validated and their images fetched, decoded and tiled in a worker thread, never on the event
loop; the engine thread does the model work, so ``/health`` answers while generation runs. Every error is
an OpenAI-style body with a 4xx/5xx status, and a bad request touches nothing but itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from nvlm.generation import SamplingParams
from nvlm.image import ImageError, load_image
from nvlm.processor import Processor
from nvlm.serve import protocol as api
from nvlm.serve.engine import Engine, QueueFull, Sequence


@dataclass
class Limits:
    max_body_bytes: int = 20 * 2**20
    max_images: int = 8  # per request
    max_image_pixels: int = 25_000_000  # per image, checked from the header before decoding
    max_queue: int = 256  # waiting sequences; beyond it, 429
    timeout_s: float = 600.0  # per request
    default_max_tokens: int = 1024
    allow_remote_images: bool = False  # fetch http(s) image URLs (an SSRF risk: off by default)
    local_image_dir: str | None = None  # file:// and paths only under this directory


def create_app(engine: Engine, model_name: str, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="nvlm", docs_url=None, redoc_url=None)
    processor = engine.processor
    context = engine.model.config.llm.max_position_embeddings
    started = int(time.time())

    @app.exception_handler(api.APIError)
    async def _api_error(_: Request, e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "malformed JSON body" if first.get("type") == "json_invalid" else f"{where}: {first.get('msg', 'invalid')}"
        return JSONResponse(api.APIError(400, msg, code="invalid_request").body(), status_code=400)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Any) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            err = api.APIError(413, f"request body over {limits.max_body_bytes} bytes", code="body_too_large")
            return JSONResponse(err.body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "nvlm"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatCompletionRequest, request: Request) -> Any:
        if req.model != model_name:
            raise api.APIError(404, f"model {req.model!r} is not served here (this server serves {model_name!r})",
                               code="model_not_found")  # fmt: skip
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        prompt, pixels = await asyncio.get_running_loop().run_in_executor(None, _prepare, req, processor, limits)
        if len(prompt.input_ids) + max_tokens > context:
            raise api.APIError(400, f"the prompt ({len(prompt.input_ids)} tokens) plus max_tokens ({max_tokens}) exceed "
                               f"the model's context of {context} tokens", code="context_length_exceeded")  # fmt: skip
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seqs = []
        for i in range(req.n):
            def emit(kind: str, value: Any, i: int = i) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))

            seed = None if req.seed is None else req.seed + i
            sampling = SamplingParams(do_sample=req.temperature > 0, temperature=req.temperature, top_p=req.top_p,
                                      top_k=req.top_k, seed=seed)  # fmt: skip
            seqs.append(Sequence(prompt, pixels, max_tokens, emit, sampling, req.repetition_penalty,
                                 tuple(processor.eos_token_ids)))  # fmt: skip
        if max_tokens == 0:
            for i in range(req.n):
                events.put_nowait((i, "done", "length"))
        else:
            try:
                engine.submit(seqs)
            except QueueFull as e:
                raise api.APIError(429, f"server busy: {e}", "rate_limit_error", "queue_full") from None
        stream = _Choices(seqs, events, req.stops, limits.timeout_s)
        id_ = api.completion_id()
        if not req.stream:
            try:
                async for _ in stream:
                    pass
            finally:
                stream.cancel()
            use = api.usage(len(prompt.input_ids), stream.completion_tokens)
            return api.completion(id_, model_name, stream.texts, stream.reasons, use)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(stream, id_, model_name, len(prompt.input_ids), req.n, include_usage),
                                 media_type="text/event-stream")  # fmt: skip

    return app


class _Choices:
    """Engine events of a request's n sequences -> text deltas, with stop strings and the timeout applied."""

    def __init__(self, seqs: list[Sequence], events: asyncio.Queue, stops: list[str], timeout: float) -> None:
        self.seqs, self.events, self.stops = seqs, events, stops
        self.deadline = time.monotonic() + timeout
        self.texts = [""] * len(seqs)
        self.sent = [0] * len(seqs)  # characters of each text already handed out
        self.reasons: list[str | None] = [None] * len(seqs)
        self.hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may still be forming

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancelled = True

    def __aiter__(self) -> AsyncIterator[tuple[int, str, str | None]]:
        return self._run()

    async def _run(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yield (choice, new text, finish_reason or None) until every choice has finished."""
        while None in self.reasons:
            try:
                i, kind, value = await asyncio.wait_for(self.events.get(), self.deadline - time.monotonic())
            except (asyncio.TimeoutError, ValueError):
                self.cancel()
                raise api.APIError(504, "the request timed out", "timeout_error", "timeout") from None
            if self.reasons[i] is not None:
                continue
            if kind == "error":
                self.cancel()
                raise api.APIError(500, value, "server_error", "generation_failed")
            if kind == "delta":
                self.texts[i] += value
                cut = min((self.texts[i].find(s) for s in self.stops if s in self.texts[i]), default=-1)
                if cut >= 0:
                    self.texts[i], self.reasons[i] = self.texts[i][:cut], "stop"
                    self.seqs[i].cancelled = True
            else:
                self.reasons[i] = value
            end = len(self.texts[i]) if self.reasons[i] else max(self.sent[i], len(self.texts[i]) - self.hold)
            new, self.sent[i] = self.texts[i][self.sent[i] : end], end
            if new or self.reasons[i]:
                yield i, new, self.reasons[i]


async def _sse(stream: _Choices, id_: str, model: str, prompt_tokens: int, n: int, include_usage: bool) -> AsyncIterator[str]:
    def event(data: Any) -> str:
        return f"data: {json.dumps(data)}\n\n"

    try:
        for i in range(n):
            yield event(api.chunk(id_, model, i, {"role": "assistant", "content": ""}))
        async for i, text, reason in stream:
            if text:
                yield event(api.chunk(id_, model, i, {"content": text}))
            if reason:
                yield event(api.chunk(id_, model, i, {}, reason))
        if include_usage:
            yield event(api.chunk(id_, model, None, use=api.usage(prompt_tokens, stream.completion_tokens)))
    except api.APIError as e:  # the status line is gone: report in the stream, as OpenAI does
        yield event(e.body())
    finally:
        stream.cancel()  # also when the client disconnects: its sequences leave the batch
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------ requests -> prompts


def _prepare(req: api.ChatCompletionRequest, processor: Processor, limits: Limits) -> tuple[Any, list[Any]]:
    """Messages -> (encoded prompt, per-image crops); runs in a worker thread."""
    messages, n_images = [], 0
    for m in req.messages:
        if isinstance(m.content, list):
            parts = []
            for p in m.content:
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text or ""})
                else:
                    if p.image_url is None:
                        raise api.APIError(400, "an image_url part needs image_url.url", code="invalid_image")
                    n_images += 1
                    if n_images > limits.max_images:
                        raise api.APIError(400, f"more than {limits.max_images} images in one request", code="too_many_images")
                    parts.append({"type": "image", "image": _image(p.image_url.url, limits)})
            messages.append({"role": m.role, "content": parts})
        else:
            messages.append({"role": m.role, "content": m.content or ""})
    try:
        rendered = processor.render(messages)
        pixels = [processor.image_processor(im) for im in rendered.images]
        return processor.encode(rendered.text, [p.shape[0] for p in pixels]), pixels
    except ValueError as e:
        raise api.APIError(400, str(e), code="invalid_request") from None


def _image(url: str, limits: Limits) -> Any:
    """A decoded PIL image from a data URL, an allowed http(s) URL, or a file under the allowed directory."""
    try:
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if not head.startswith("data:image/") or ";base64" not in head:
                raise api.APIError(400, f"image data URLs must be data:image/...;base64 (got {head[:40]!r})", code="invalid_image")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise api.APIError(400, "the image data URL is not valid base64", code="invalid_image") from None
            return load_image(raw, max_pixels=limits.max_image_pixels)
        if url.startswith(("http://", "https://")):
            if not limits.allow_remote_images:
                raise api.APIError(400, "http(s) image URLs are disabled on this server (start it with --allow-remote-images)",
                                   code="remote_images_disabled")  # fmt: skip
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (opt-in)
                raw = r.read(limits.max_body_bytes + 1)
            if len(raw) > limits.max_body_bytes:
                raise api.APIError(400, "the remote image is too large", code="invalid_image")
            return load_image(raw, max_pixels=limits.max_image_pixels)
        path = Path(url.removeprefix("file://"))
        root = limits.local_image_dir
        if root is None or not path.resolve().is_relative_to(Path(root).resolve()):
            raise api.APIError(400, "local image files are only read under the server's --image-dir", code="invalid_image")
        return load_image(path, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise api.APIError(400, str(e), code="invalid_image") from None
    except OSError as e:
        raise api.APIError(400, f"could not fetch the image: {e}", code="invalid_image") from None
