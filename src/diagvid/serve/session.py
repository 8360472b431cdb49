"""One websocket client: read and check its messages, queue its stream, send what the worker delivers.

Two tasks per client: this one reads messages; a sender task owns every write to the socket, in order,
from one queue (status messages, chunk messages with their frames, errors). The worker thread puts into
that queue with `call_soon_threadsafe`; chunks only arrive as fast as the sender frees credits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from diagvid.serve.protocol import PromptRequest, ProtocolError, StartRequest, StopRequest, parse_message
from diagvid.serve.runner import Job, Outgoing, QueueFull, Runner
from diagvid.serve.settings import ServeSettings

CLOSE_TRY_LATER = 1013  # RFC 6455: try again later


class RateLimit:
    """Token bucket: `rate` messages a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        """Take a token if there is one."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ClientSession:
    """The state of one connected client; nothing of it outlives the connection."""

    def __init__(
        self,
        ws: WebSocket,
        runner: Runner,
        settings: ServeSettings,
        default_schedule: str,
        check_prompt: Callable[[str], object],
        hello: dict,
    ) -> None:
        self.ws = ws
        self.runner = runner
        self.settings = settings
        self.default_schedule = default_schedule
        self.check_prompt = check_prompt
        self.hello = hello
        self.job: Job | None = None
        self.rate = RateLimit(settings.messages_per_second, settings.message_burst)
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._rate_warned = 0.0

    async def run(self) -> None:
        """Serve the client until it leaves or is refused; its stream is cancelled either way."""
        sender = asyncio.create_task(self._send_loop())
        closing = False
        try:
            self._put(Outgoing(self.hello))
            while not closing and not sender.done():
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                closing = self._handle(message)
        except WebSocketDisconnect:
            pass
        finally:
            if self.job is not None:
                self.runner.cancel(self.job, disconnected=not closing)
                self.job = None
            if closing:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sender, timeout=5)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    def deliver(self, item: Outgoing) -> None:
        """Thread-safe: queue a message for this client (what the worker calls)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the client is too
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, item)

    # ----- inside the event loop ---------------------------------------------------------------------------

    def _put(self, item: Outgoing) -> None:
        self._outbox.put_nowait(item)

    def _error(self, message: str) -> None:
        self._put(Outgoing({"type": "error", "message": message}))

    def _handle(self, message: dict) -> bool:
        """Act on one client message; True when the connection is to close after the replies."""
        if not self.rate.allow():
            now = time.monotonic()
            if now - self._rate_warned > 1.0:  # one warning a second, or the errors become the flood
                self._rate_warned = now
                self._error(
                    f"too many messages: the limit is {self.settings.messages_per_second:g} a second "
                    f"(bursts of {self.settings.message_burst}); messages above it are dropped"
                )
            return False
        text = message.get("text")
        if text is None:
            size = len(message.get("bytes") or b"")
            self._error(f"binary message of {size} bytes ignored; send JSON text messages")
            return False
        try:
            request = parse_message(text, self.settings, self.default_schedule, self.check_prompt)
        except ProtocolError as err:
            self._error(str(err))
            return False
        running = self.job is not None and not self.job.ended.is_set()
        if isinstance(request, StartRequest):
            if running:
                self._error('a stream is already running; send {"type": "stop"} first')
                return False
            job = Job(request, self.deliver, self.settings.chunks_ahead)
            try:
                self.runner.submit(job)
            except QueueFull as err:
                self._put(Outgoing({"type": "refused", "message": str(err)}, close=True))
                return True
            self.job = job
        elif isinstance(request, PromptRequest):
            if not running:
                self._error("no stream is running; send a 'start' message first")
                return False
            self.job.switch_prompt(request.prompt)
            self._put(Outgoing({"type": "prompt", "prompt": request.prompt}))
        elif isinstance(request, StopRequest):
            if not running:
                self._error("no stream is running; nothing to stop")
                return False
            self.runner.cancel(self.job)
        return False

    async def _send_loop(self) -> None:
        """Every write to the socket, in order; a chunk's credit goes back once its frames are out."""
        while True:
            item = await self._outbox.get()
            await self.ws.send_text(json.dumps(item.message))
            for frame in item.frames:
                await self.ws.send_bytes(frame)
            if item.sent is not None:
                item.sent()
            if item.close:
                await self.ws.close(code=CLOSE_TRY_LATER, reason="queue full")
                return
