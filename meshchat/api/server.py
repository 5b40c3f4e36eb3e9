"""The HTTP face of the API: aiohttp routes in the node's own event loop.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as
server-sent events when asked: one chunk per token, then `data: [DONE]`). Errors use OpenAI's
shape and status codes. A client that disconnects mid-stream frees its session on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from meshchat.api.requests import (
    ApiError,
    GenerationRequest,
    decode_body,
    parse_chat,
    parse_completion,
)
from meshchat.api.sessions import PoolBusyError, SessionPool
from meshchat.engine.stage import ContextOverflowError
from meshchat.engine.tokenizer import Tokenizer
from meshchat.errors import MeshchatError
from meshchat.inference.head import ChatPrompter, GenerationStats, HeadSession
from meshchat.inference.pipeline import Pipeline
from meshchat.inference.serving import RETRY_AFTER_S, GateFull, PlanGate, Unavailable
from meshchat.model.gguf_file import GGUFHeader

log = logging.getLogger("meshchat.api")

MAX_BODY_BYTES = 1 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ApiModel:
    """What the API serves: one model, its tokenizer and template, a pool of sessions."""

    model_id: str
    fingerprint: str
    tokenizer: Tokenizer
    prompter: ChatPrompter
    pool: SessionPool
    n_ctx: int
    gate: PlanGate | None = None  # a mesh head's: requests wait out plan changes, or get 503

    def counts(self) -> dict[str, int]:
        """What requests hold right now (all zero when the API is idle)."""
        return {
            "api_slots_busy": self.pool.busy,
            "api_slots_idle": self.pool.idle,
            "queued": self.pool.waiting + (self.gate.waiting if self.gate else 0),
        }


def _error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return web.json_response(error.body(), status=error.status, headers=headers)


def make_app(model: ApiModel, api_key: str | None = None) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[_errors_middleware, _auth_middleware(api_key)]
    )
    routes = _Routes(model)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_post("/v1/chat/completions", routes.chat)
    app.router.add_post("/v1/completions", routes.completions)
    return app


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return _error_response(error)
    except web.HTTPRequestEntityTooLarge:
        return _error_response(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes"))
    except web.HTTPException as exc:
        if exc.status == 404:
            return _error_response(ApiError(404, f"no route {request.path}", code="not_found"))
        if exc.status == 405:
            return _error_response(ApiError(405, f"{request.method} not allowed on {request.path}"))
        raise


def _auth_middleware(api_key: str | None) -> Middleware:
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401, "missing or wrong API key", "authentication_error", code="invalid_api_key"
                )
        return await handler(request)

    return check


class _Routes:
    def __init__(self, model: ApiModel) -> None:
        self.model = model

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "meshchat",
            "fingerprint": self.model.fingerprint,
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await _json(request))
        self._check_model(parsed)
        assert parsed.messages is not None
        try:
            tokens = self.model.prompter.tokens(parsed.messages)
        except MeshchatError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await self._respond(request, parsed, tokens, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion(await _json(request))
        self._check_model(parsed)
        assert parsed.prompt is not None
        tokens = self.model.tokenizer.tokenize(parsed.prompt, add_special=True)
        return await self._respond(request, parsed, tokens, chat=False)

    def _check_model(self, parsed: GenerationRequest) -> None:
        if parsed.model and parsed.model != self.model.model_id:
            raise ApiError(
                404,
                f"model {parsed.model!r} is not served here; this mesh serves "
                f"{self.model.model_id!r}",
                param="model",
                code="model_not_found",
            )

    async def _respond(
        self, request: web.Request, parsed: GenerationRequest, tokens: list[int], chat: bool
    ) -> web.StreamResponse:
        n_ctx = self.model.n_ctx
        if len(tokens) >= n_ctx:
            raise ApiError(
                400,
                f"the prompt has {len(tokens)} tokens; the context holds {n_ctx}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = parsed.max_tokens or n_ctx - len(tokens)
        gate = self.model.gate
        try:
            async with (
                gate.request() if gate else contextlib.nullcontext(),
                self.model.pool.session(tokens) as session,
            ):
                run = _Run(session, tokens, parsed, max_tokens, chat, self.model.model_id)
                if parsed.stream:
                    return await run.stream(request)
                return await run.whole()
        except (PoolBusyError, GateFull) as exc:
            raise ApiError(429, str(exc), "rate_limit_error", code="busy") from exc
        except Unavailable as exc:
            raise ApiError(
                503, str(exc), "server_error", code="unavailable", retry_after=exc.retry_after
            ) from exc
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from exc
        except MeshchatError as exc:
            raise ApiError(
                503, f"generation failed: {exc}", "server_error", retry_after=RETRY_AFTER_S
            ) from exc


async def _json(request: web.Request) -> Any:
    try:
        text = await request.text()
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from exc
    return decode_body(text)


class _Run:
    """One request's generation, answered whole or as a stream of chunks."""

    def __init__(
        self,
        session: HeadSession,
        tokens: list[int],
        parsed: GenerationRequest,
        max_tokens: int,
        chat: bool,
        model_id: str,
    ) -> None:
        self.session = session
        self.tokens = tokens
        self.parsed = parsed
        self.max_tokens = max_tokens
        self.chat = chat
        self.model_id = model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _texts(self) -> AsyncIterator[str]:
        return self.session.generate(
            self.tokens, self.parsed.params, self.max_tokens, self.parsed.stop
        )

    async def whole(self) -> web.Response:
        text = "".join([t async for t in self._texts()])
        stats = self.session.last_stats
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": stats.finish_reason,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": stats.finish_reason,
            }
        return web.json_response(
            {
                "id": self.id,
                "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model_id,
                "choices": [choice],
                "usage": _usage(stats),
            }
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            if self.chat:
                await self._send(response, {"role": "assistant", "content": ""}, None)
            async for text in self._texts():
                await self._send(response, {"content": text} if self.chat else text, None)
            stats = self.session.last_stats
            await self._send(
                response, {} if self.chat else "", stats.finish_reason, usage=_usage(stats)
            )
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away: raising frees the session (and its KV) on every stage.
            log.info("client left mid-stream; session %s freed", self.session.session_id)
            raise
        return response

    async def _send(
        self,
        response: web.StreamResponse,
        delta: dict[str, str] | str,
        finish_reason: str | None,
        usage: dict[str, int] | None = None,
    ) -> None:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
        }
        if usage is not None:
            chunk["usage"] = usage
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())


def _usage(stats: GenerationStats) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


async def start_api(
    model: ApiModel, host: str, port: int, api_key: str | None = None
) -> web.AppRunner:
    """Serve the API on host:port in the running event loop; stop with `runner.cleanup()`."""
    runner = web.AppRunner(make_app(model, api_key), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise MeshchatError(f"cannot serve the API on {host}:{port}: {exc.strerror}") from exc
    return runner


def api_model(
    model_id: str,
    fingerprint: str,
    header: GGUFHeader,
    tokenizer: Tokenizer,
    pipeline: Pipeline,
    max_sessions: int,
    max_waiting: int = 16,
    gate: PlanGate | None = None,
) -> ApiModel:
    """Everything the API needs to serve `pipeline`'s model."""
    return ApiModel(
        model_id=model_id,
        fingerprint=fingerprint,
        tokenizer=tokenizer,
        prompter=ChatPrompter.for_model(header, tokenizer),
        pool=SessionPool(pipeline, tokenizer, max_sessions, max_waiting),
        n_ctx=pipeline.n_ctx,
        gate=gate,
    )
