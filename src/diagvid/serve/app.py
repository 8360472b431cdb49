"""The FastAPI app of `diagvid serve`: the page, the websocket, health, metrics and mp4 downloads.

Routes: `GET /` (the page, from memory), `WS /ws` (the stream protocol, see docs/serve.md),
`GET /health`, `GET /metrics`, `GET /videos/{id}.mp4` (a finished stream, looked up by random id).
No route takes a path from the client.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from diagvid.serve.frames import MEDIA_TYPES
from diagvid.serve.runner import Runner
from diagvid.serve.session import CLOSE_TRY_LATER, ClientSession
from diagvid.serve.settings import ServeSettings
from diagvid.serve.videos import VideoStore
from diagvid.stream import Pipeline

CLOSE_POLICY = 1008  # RFC 6455: policy violation (a foreign origin)


def load_page() -> tuple[str, str]:
    """The page's HTML and a Content-Security-Policy that allows exactly its inline script and style."""
    html = (resources.files("diagvid.serve") / "static" / "index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found
        )

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' blob:; media-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, csp


def model_info(pipeline: Pipeline) -> dict:
    """What /health and the page's hello say about the model."""
    cfg = pipeline.config
    stride = pipeline.vae.spatial_stride
    return {
        "parameters": sum(p.numel() for p in pipeline.generator.parameters()),
        "device": str(pipeline.device),
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "fps": cfg.fps,
        "width": cfg.latent_hw[1] * stride,
        "height": cfg.latent_hw[0] * stride,
        "frames_per_chunk": cfg.frames_per_chunk,
        "default_schedule": cfg.schedule,
        "window_frames": cfg.window_frames,
    }


def create_app(pipeline: Pipeline, settings: ServeSettings | None = None) -> FastAPI:
    """A web demo over one pipeline; every client shares the model, one stream at a time."""
    settings = settings or ServeSettings()
    store = VideoStore(settings.max_videos)
    runner = Runner(pipeline, settings, store)
    page, csp = load_page()
    info = model_info(pipeline)
    default_schedule = (
        pipeline.config.schedule if pipeline.config.schedule in settings.schedules else settings.schedules[0]
    )
    sessions: set[ClientSession] = set()
    served = {"connections": 0, "refused_connections": 0}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.close()
        store.close()
        pipeline.close()  # the decode worker of --overlap-decode, if one runs

    app = FastAPI(title="diagvid serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    app.state.store = store
    app.state.sessions = sessions

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        }
        return HTMLResponse(page, headers=headers)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # browsers ask; an empty answer keeps the log clean

    @app.get("/health")
    def health() -> JSONResponse:
        snap = runner.snapshot()
        return JSONResponse(
            {
                "ok": snap["worker_alive"],
                "model": info,
                "queue_length": snap["queue_length"],
                "active_stream": snap["active"],
                "clients": len(sessions),
                "served": {**snap["counts"], **served},
            }
        )

    @app.get("/metrics")
    def metrics() -> JSONResponse:
        snap = runner.snapshot()
        return JSONResponse(
            {
                **snap,
                **served,
                "clients": len(sessions),
                "videos_kept": len(store),
                "settings": {"max_queue": settings.max_queue, **settings.limits()},
            }
        )

    @app.get("/videos/{video_id}.mp4")
    def video(video_id: str) -> Response:
        path = store.get(video_id)
        if path is None:
            return JSONResponse(
                {"error": "no such video (it may have been replaced by newer ones)"}, status_code=404
            )
        return FileResponse(path, media_type="video/mp4", filename=f"diagvid-{video_id[:8]}.mp4")

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        if not _origin_allowed(ws, settings.allowed_origins):
            await ws.close(code=CLOSE_POLICY)
            return
        await ws.accept()
        if len(sessions) >= settings.max_connections:
            served["refused_connections"] += 1
            message = f"too many clients ({settings.max_connections}); try again later"
            await ws.send_json({"type": "refused", "message": message})
            await ws.close(code=CLOSE_TRY_LATER)
            return
        hello = {
            "type": "hello",
            "model": info,
            "limits": settings.limits(),
            "default_schedule": default_schedule,
            "frame_type": MEDIA_TYPES[settings.frame_format],
        }
        session = ClientSession(
            ws, runner, settings, default_schedule, pipeline.text_encoder.token_ids, hello
        )
        sessions.add(session)
        served["connections"] += 1
        try:
            await session.run()
        finally:
            sessions.discard(session)

    return app


def _origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Browsers send Origin: accept the page's own and the configured ones; other clients send none."""
    origin = ws.headers.get("origin")
    if origin is None or origin in allowed:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host")
