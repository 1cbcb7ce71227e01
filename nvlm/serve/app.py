"""The FastAPI app: ``POST /v1/chat/completions`` (plain or streamed), ``GET /v1/models``, ``GET /health``.

Layers, outermost first (docs/SERVER.md lists what each guarantees): the body limit counts bytes as they
arrive (``body.py``); the prompt is rendered and its length bounded before images are fetched (on a pool of
their own, ``fetch.py``), decoded and tiled, and before it is tokenized, in worker threads, never on the
event loop; the engine thread does the model work, so ``/health`` answers while generation runs. Every
error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status,
and a bad request touches nothing but itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvlm.engine import Sequence
from nvlm.image import ImageError, load_image
from nvlm.processor import Processor
from nvlm.sampling import SamplingParams
from nvlm.serve import protocol as api
from nvlm.serve.body import BodyLimit
from nvlm.serve.engine import EngineThread, Job, QueueFull
from nvlm.serve.fetch import FETCH_FAILED, FetchError, fetch
from nvlm.serve.limits import Limits
from nvlm.template import Rendered


def create_app(engine: EngineThread, model_name: str, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="nvlm", docs_url=None, redoc_url=None)
    too_large = api.APIError(413, f"request body over {limits.max_body_bytes} bytes", code="body_too_large")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, error_body=too_large.body())
    processor = engine.processor
    processor.min_tokens("")  # finds the vocabulary's longest token now (~0.3 s for Qwen2.5), not in a request
    context = engine.model.config.llm.max_position_embeddings
    started = int(time.time())
    fetch_pool = ThreadPoolExecutor(max_workers=limits.fetch_workers, thread_name_prefix="nvlm-fetch")

    @app.exception_handler(api.APIError)
    async def _api_error(_: Request, e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            err = api.APIError(400, "malformed JSON body", code="invalid_json")
        else:
            err = api.APIError(
                400, f"{where}: {first.get('msg', 'invalid')}", code="invalid_request", param=where or None
            )
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:  # 404, 405, an unreadable body
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request")
        err = api.APIError(e.status_code, str(e.detail), code=code)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:  # a bug still answers in the OpenAI shape
        err = api.APIError(500, f"internal error: {type(e).__name__}", "server_error", "internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "nvlm"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatCompletionRequest, request: Request) -> Any:
        if req.model != model_name:
            raise api.APIError(
                404,
                f"model {req.model!r} is not served here (this server serves {model_name!r})",
                code="model_not_found",
                param="model",
            )
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        budget = context - max_tokens  # tokens the prompt may have
        if budget < 1:
            raise _too_long("the prompt", max_tokens, context)
        loop = asyncio.get_running_loop()
        rendered = await loop.run_in_executor(None, _render, req, processor, limits, budget, max_tokens, context)
        fetched = await _fetch_all(rendered.images, limits, fetch_pool)
        prompt, pixels = await loop.run_in_executor(None, _encode, rendered, processor, limits, fetched)
        if len(prompt.input_ids) > budget:
            raise _too_long(f"the prompt ({len(prompt.input_ids)} tokens)", max_tokens, context)
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        requests = []
        for i in range(req.n):

            def emit(kind: str, value: Any, i: int = i) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))

            params = SamplingParams(
                max_new_tokens=max_tokens,
                do_sample=req.temperature > 0,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                repetition_penalty=req.repetition_penalty,
                seed=req.choice_seed(i),
                stop=tuple(req.stops),
                eos_token_id=processor.eos_token_ids,
            )
            requests.append(Job(prompt, pixels, params, emit))
        seqs: list[Sequence] = []
        if max_tokens == 0:
            for i in range(req.n):
                events.put_nowait((i, "done", "length"))
        else:
            try:
                seqs = engine.submit(requests)
            except QueueFull as e:
                raise api.APIError(429, f"server busy: {e}", "rate_limit_error", "queue_full") from None
        stream = _Choices(seqs, events, req.n, limits.timeout_s)
        id_ = api.completion_id()
        if not req.stream:
            if not await _drain_unless_disconnected(stream, request):
                return Response(status_code=499)  # nobody reads it; the sequences have left the batch
            use = api.usage(len(prompt.input_ids), stream.completion_tokens)
            return api.completion(id_, model_name, stream.texts, stream.reasons, use)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(stream, id_, model_name, len(prompt.input_ids), req.n, include_usage), media_type="text/event-stream"
        )

    return app


def _too_long(prompt: str, max_tokens: int, context: int) -> api.APIError:
    return api.APIError(
        400,
        f"{prompt} plus max_tokens ({max_tokens}) exceed the model's context of {context} tokens",
        code="context_length_exceeded",
        param="messages",
    )


async def _drain_unless_disconnected(stream: _Choices, request: Request) -> bool:
    """Wait for every choice of a non-streamed request; False if the client left first (its sequences are
    cancelled then, so they stop decoding at the next step)."""
    done = asyncio.ensure_future(_drain(stream))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
        stream.cancel()
    if done.cancelled():
        return False
    done.result()  # raises the request's APIError, if any
    return True


async def _drain(stream: _Choices) -> None:
    async for _ in stream:
        pass


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is read by now: ``receive`` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Choices:
    """Engine events of a request's n sequences -> text deltas (stop strings already cut by the engine),
    with the timeout applied."""

    def __init__(self, seqs: list[Sequence], events: asyncio.Queue, n: int, timeout: float) -> None:
        self.seqs, self.events = seqs, events
        self.deadline = time.monotonic() + timeout
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()

    def __aiter__(self) -> AsyncIterator[tuple[int, str, str | None]]:
        return self._run()

    async def _run(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yield (choice, new text, finish_reason or None) until every choice has finished."""
        while None in self.reasons:
            try:
                i, kind, value = await asyncio.wait_for(self.events.get(), self.deadline - time.monotonic())
            except (TimeoutError, ValueError):
                self.cancel()
                raise api.APIError(504, "the request timed out", "timeout_error", "timeout") from None
            if self.reasons[i] is not None:
                continue
            if kind == "error":
                self.cancel()
                raise api.APIError(500, value, "server_error", "generation_failed")
            if kind == "delta":
                self.texts[i] += value
                yield i, value, None
            else:
                self.reasons[i] = value
                yield i, "", value


async def _sse(
    stream: _Choices, id_: str, model: str, prompt_tokens: int, n: int, include_usage: bool
) -> AsyncIterator[str]:
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


def _render(
    req: api.ChatCompletionRequest, processor: Processor, limits: Limits, budget: int, max_tokens: int, context: int
) -> Rendered:
    """Messages -> the rendered prompt (images still as URLs), refused before anything costly when its text
    alone must take more than ``budget`` tokens; runs in a worker thread."""
    messages: list[dict[str, Any]] = []
    n_images = 0
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
                        raise api.APIError(
                            400, f"more than {limits.max_images} images in one request", code="too_many_images"
                        )
                    _check_url(p.image_url.url, limits)
                    parts.append({"type": "image", "image": p.image_url.url})
            messages.append({"role": m.role, "content": parts})
        else:
            messages.append({"role": m.role, "content": m.content or ""})
    try:
        rendered = processor.render(messages)
    except ValueError as e:
        raise api.APIError(400, str(e), code="invalid_request", param="messages") from None
    at_least = processor.min_tokens(rendered.text)
    if at_least > budget:
        raise _too_long(f"the prompt (at least {at_least} tokens by its length)", max_tokens, context)
    return rendered


def _encode(
    rendered: Rendered, processor: Processor, limits: Limits, fetched: dict[str, bytes]
) -> tuple[Any, list[Any]]:
    """The rendered prompt -> (encoded prompt, per-image crops); runs in a worker thread."""
    try:
        pixels = [processor.image_processor(_image(url, limits, fetched)) for url in rendered.images]
        return processor.encode(rendered.text, [p.shape[0] for p in pixels]), pixels
    except ImageError as e:
        raise api.APIError(400, str(e), code="invalid_image", param="messages") from None
    except ValueError as e:
        raise api.APIError(400, str(e), code="invalid_request", param="messages") from None


def _check_url(url: str, limits: Limits) -> None:
    """Refuse at once an image URL this server would never read."""
    if url.startswith("data:"):
        return
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise api.APIError(
                400,
                "http(s) image URLs are disabled on this server (start it with --allow-remote-images)",
                code="remote_images_disabled",
            )
        return
    if "\x00" in url:
        raise api.APIError(400, "an image path cannot hold a NUL character", code="invalid_image")
    root = limits.local_image_dir
    try:
        inside = root is not None and Path(url.removeprefix("file://")).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        inside = False
    if not inside:
        raise api.APIError(400, "local image files are only read under the server's --image-dir", code="invalid_image")


async def _fetch_all(urls: list[str], limits: Limits, pool: ThreadPoolExecutor) -> dict[str, bytes]:
    """The bytes of a request's http(s) images, fetched on the fetch pool under one deadline."""
    remote = sorted({u for u in urls if u.startswith(("http://", "https://"))})
    if not remote:
        return {}
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(pool, fetch, u, limits.max_body_bytes, limits.fetch_timeout_s) for u in remote]
    try:
        return dict(zip(remote, await asyncio.wait_for(asyncio.gather(*jobs), limits.fetch_timeout_s), strict=True))
    except (TimeoutError, FetchError):
        for j in jobs:
            j.cancel()
        raise api.APIError(400, FETCH_FAILED, code="invalid_image", param="messages") from None


def _image(url: str, limits: Limits, fetched: dict[str, bytes]) -> Any:
    """A decoded PIL image from a data URL, a fetched http(s) URL, or a file under the allowed directory."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.startswith("data:image/") or ";base64" not in head:
            raise api.APIError(
                400, f"image data URLs must be data:image/...;base64 (got {head[:40]!r})", code="invalid_image"
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise api.APIError(400, "the image data URL is not valid base64", code="invalid_image") from None
        return load_image(raw, max_pixels=limits.max_image_pixels)
    if url in fetched:
        return load_image(fetched[url], max_pixels=limits.max_image_pixels)
    return load_image(Path(url.removeprefix("file://")), max_pixels=limits.max_image_pixels)
