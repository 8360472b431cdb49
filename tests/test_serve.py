"""`diagvid serve` through FastAPI's TestClient: protocol, backpressure, queue, limits, downloads, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect
from typer.testing import CliRunner

from diagvid.serve import ServeSettings, create_app
from diagvid.stream import Pipeline, StreamConfig
from diagvid.video_io import read_video

PROMPT = "a red circle moves left"
OTHER = "a blue square moves up"
FAST = {"frame_format": "png", "lead_seconds": None}  # exact frames, no real-time pacing


class SpyPipeline(Pipeline):
    """Records (time, chunk index) each time the engine starts a chunk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_starts: list[tuple[float, int]] = []

    def stream(self, *args, prompt_source=None, **kwargs):
        def spy(index: int) -> str | None:
            self.chunk_starts.append((time.monotonic(), index))
            return prompt_source(index) if prompt_source else None

        return super().stream(*args, prompt_source=spy, **kwargs)


@pytest.fixture
def pipe(_tiny_pipeline_models) -> SpyPipeline:
    m = _tiny_pipeline_models
    return SpyPipeline(m.generator, m.vae, m.text_encoder, StreamConfig(frames_per_chunk=2, latent_hw=(4, 4)))


@contextlib.contextmanager
def serving(pipe: Pipeline, **settings):
    app = create_app(pipe, ServeSettings(**{**FAST, **settings}))
    with TestClient(app) as client:
        yield client, app


def hello(ws) -> dict:
    msg = ws.receive_json()
    assert msg["type"] == "hello", msg
    return msg


def read_until_done(ws) -> tuple[list[dict], list[bytes]]:
    """Every message up to and including `done`; frames in the order they came."""
    messages, frames = [], []
    while True:
        msg = ws.receive_json()
        messages.append(msg)
        if msg["type"] == "chunk":
            frames += [ws.receive_bytes() for _ in range(msg["frames"])]
        if msg["type"] == "done":
            return messages, frames


def decode(frames: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames])


def of_type(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["type"] == kind]


def wait_idle(app, timeout: float = 5.0) -> None:
    """Until no stream runs, none waits and no client is connected (per-client state freed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = app.state.runner.snapshot()
        if snap["active"] is None and snap["queue_length"] == 0 and not app.state.sessions:
            return
        time.sleep(0.02)
    raise AssertionError(
        f"server not idle: {app.state.runner.snapshot()}, {len(app.state.sessions)} sessions"
    )


def start(ws, **fields) -> None:
    ws.send_json({"type": "start", "prompt": PROMPT, **fields})


# ----- streaming ---------------------------------------------------------------------------------------------


def test_health_and_metrics(pipe):
    with serving(pipe) as (client, _app):
        health = client.get("/health").json()
        assert health["ok"] is True and health["queue_length"] == 0 and health["active_stream"] is None
        assert health["model"]["fps"] == 16 and (health["model"]["width"], health["model"]["height"]) == (
            16,
            16,
        )
        assert health["served"]["finished"] == 0
        with client.websocket_connect("/ws") as ws:
            hello(ws)
            start(ws, seconds=0.5)
            read_until_done(ws)
        metrics = client.get("/metrics").json()
        assert metrics["counts"]["finished"] == 1 and metrics["counts"]["chunks"] == 2
        assert metrics["counts"]["frames"] == 13 and metrics["counts"]["nfe"] == 5 + 3
        assert metrics["mean_chunk_seconds"] > 0 and metrics["last_ttff_seconds"] > 0
        assert client.get("/health").json()["served"]["connections"] == 1


def test_stream_delivers_every_frame_in_order_with_chunk_figures(pipe):
    expected, _ = pipe.generate(PROMPT, num_chunks=3, seed=3, schedule="diagonal")
    with serving(pipe) as (client, app):
        with client.websocket_connect("/ws") as ws:
            info = hello(ws)
            assert info["limits"]["schedules"] == ["diagonal", "diagonal-5to2", "self-forcing", "causvid"]
            start(ws, seconds=1, seed=3, schedule="diagonal")
            messages, frames = read_until_done(ws)
        wait_idle(app)
    started, chunks, done = of_type(messages, "started"), of_type(messages, "chunk"), messages[-1]
    assert started[0]["num_chunks"] == 3 and started[0]["seed"] == 3
    assert [c["index"] for c in chunks] == [0, 1, 2]
    assert [c["nfe"] for c in chunks] == [5, 3, 2]
    assert [c["timesteps"] for c in chunks] == [[1000, 933, 833, 357], [1000, 933, 357], [1000, 357]]
    assert [c["first_frame"] for c in chunks] == [0, 5, 13]
    assert all(c["fps"] > 0 and c["ttff"] > 0 and c["chunk_seconds"] > 0 for c in chunks)
    assert done["reason"] == "finished" and done["frames"] == 21 and done["nfe"] == 10
    assert np.array_equal(decode(frames), expected)  # PNG: exact, every frame, in order


def test_jpeg_frames(pipe):
    expected, _ = pipe.generate(PROMPT, num_chunks=2, seed=1)
    with serving(pipe, frame_format="jpeg") as (client, _app), client.websocket_connect("/ws") as ws:
        assert hello(ws)["frame_type"] == "image/jpeg"
        start(ws, seconds=0.5, seed=1)
        _, frames = read_until_done(ws)
    assert all(f[:2] == b"\xff\xd8" for f in frames)
    assert np.abs(decode(frames).astype(int) - expected.astype(int)).mean() < 20  # lossy, same video


def test_download_mp4_of_a_finished_stream(pipe, tmp_path):
    with serving(pipe) as (client, _app):
        with client.websocket_connect("/ws") as ws:
            hello(ws)
            start(ws, seconds=1, seed=2)
            messages, frames = read_until_done(ws)
        url = messages[-1]["video"]
        assert url.startswith("/videos/") and url.endswith(".mp4")
        response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    (tmp_path / "v.mp4").write_bytes(response.content)
    video = read_video(tmp_path / "v.mp4")
    assert video.shape == (21, 16, 16, 3)
    assert np.abs(video.astype(int) - decode(frames).astype(int)).mean() < 20  # h264 is lossy


def test_prompt_switch_mid_stream(pipe):
    # paced, so the switch lands in chunk 1 or 2 however loaded the machine is
    with serving(pipe, lead_seconds=0.2) as (client, _app), client.websocket_connect("/ws") as ws:
        hello(ws)
        start(ws, seconds=2, seed=4)
        assert ws.receive_json()["type"] == "started"
        first = ws.receive_json()
        frames = [ws.receive_bytes() for _ in range(first["frames"])]
        ws.send_json({"type": "prompt", "prompt": OTHER})
        messages, rest = read_until_done(ws)
    assert of_type(messages, "prompt") == [{"type": "prompt", "prompt": OTHER}]
    prompts = [first["prompt"]] + [c["prompt"] for c in of_type(messages, "chunk")]
    switch = prompts.index(OTHER)
    assert switch in (1, 2), prompts  # from the next chunk on (one may already be under way)
    assert prompts == [PROMPT] * switch + [OTHER] * (len(prompts) - switch)
    expected, _ = pipe.generate(
        PROMPT, num_chunks=len(prompts), seed=4, prompt_source=lambda i: OTHER if i == switch else None
    )
    assert np.array_equal(decode(frames + rest), expected)


def test_stop_cancels_within_one_chunk_and_frees_the_stream(pipe, monkeypatch):
    with serving(pipe) as (client, app):
        runner = app.state.runner
        stopped_at = []
        original = runner.cancel

        def spy(job, **kw):
            stopped_at.append(time.monotonic())
            original(job, **kw)

        monkeypatch.setattr(runner, "cancel", spy)
        with client.websocket_connect("/ws") as ws:
            hello(ws)
            start(ws, endless=True)
            assert ws.receive_json()["type"] == "started"
            first = ws.receive_json()
            [ws.receive_bytes() for _ in range(first["frames"])]
            ws.send_json({"type": "stop"})
            messages, _ = read_until_done(ws)
            done = messages[-1]
            assert done["reason"] == "stopped" and done["video"]  # a stopped stream can be downloaded too
            assert client.get(done["video"]).status_code == 200
            # the same connection starts again after a stop
            start(ws, seconds=0.5)
            assert read_until_done(ws)[0][-1]["reason"] == "finished"
        wait_idle(app)
    after_stop = [i for t, i in pipe.chunk_starts if t > stopped_at[0]]
    assert len(after_stop) <= 1 + 2, after_stop  # at most the chunk under way, then the 2 of the next stream
    assert runner.snapshot()["counts"]["stopped"] == 1


def test_disconnect_cancels_the_stream(pipe):
    with serving(pipe, lead_seconds=0.2) as (client, app):
        with client.websocket_connect("/ws") as ws:
            hello(ws)
            start(ws, endless=True)
            assert ws.receive_json()["type"] == "started"
            assert ws.receive_json()["type"] == "chunk"
        wait_idle(app)
        counts = app.state.runner.snapshot()["counts"]
        assert counts["stopped"] == 1 and counts["finished"] == 0
        assert len(app.state.store) == 0  # nobody to download it: the recording is dropped


def test_queue_positions_and_refusal_when_full(pipe):
    # paced at real time, so the first stream keeps the model while the others queue
    with serving(pipe, max_queue=2, lead_seconds=0.2) as (client, app):
        with (
            client.websocket_connect("/ws") as a,
            client.websocket_connect("/ws") as b,
            client.websocket_connect("/ws") as c,
            client.websocket_connect("/ws") as d,
        ):
            for ws in (a, b, c, d):
                hello(ws)
            start(a, endless=True)
            assert a.receive_json()["type"] == "started"
            start(b, seconds=0.5)
            assert b.receive_json() == {"type": "queued", "position": 1}
            start(c, seconds=0.5)
            assert c.receive_json() == {"type": "queued", "position": 2}
            assert client.get("/health").json()["queue_length"] == 2
            start(d, seconds=0.5)
            refused = d.receive_json()
            assert (
                refused["type"] == "refused"
                and "queue is full (2 streams waiting, limit 2)" in refused["message"]
            )
            with pytest.raises(WebSocketDisconnect) as closed:
                d.receive_json()
            assert closed.value.code == 1013
            b.send_json({"type": "stop"})  # leaving the queue moves c up
            assert b.receive_json()["reason"] == "stopped"
            assert c.receive_json() == {"type": "queued", "position": 1}
            a.send_json({"type": "stop"})
            assert read_until_done(a)[0][-1]["reason"] == "stopped"
            messages, _ = read_until_done(c)
            assert messages[0]["type"] == "started" and messages[-1]["reason"] == "finished"
        wait_idle(app)
        assert app.state.runner.snapshot()["counts"]["refused"] == 1


def test_too_many_connections_are_refused(pipe):
    with serving(pipe, max_connections=1) as (client, _app), client.websocket_connect("/ws") as a:
        hello(a)
        with client.websocket_connect("/ws") as b:
            msg = b.receive_json()
            assert msg["type"] == "refused" and "too many clients (1)" in msg["message"]


# ----- bad input ---------------------------------------------------------------------------------------------

START = {"type": "start", "prompt": PROMPT, "seconds": 1}
BAD = [
    ({**START, "prompt": "  "}, "prompt is empty"),
    ({**START, "prompt": "red " * 50 + "a"}, "prompt has 201 characters; the limit is 200"),
    ({**START, "prompt": "a red\x07 circle"}, "non-printable character '\\x07'"),
    ({**START, "prompt": "a purple circle"}, "unknown word 'purple'"),
    ({**START, "prompt": 42}, "prompt=42 must be a string"),
    ({**START, "seconds": 0}, "seconds=0 is outside (0, 60.0]"),
    ({**START, "seconds": 61}, "seconds=61 is outside (0, 60.0]"),
    ({**START, "seconds": "5"}, "seconds='5' must be a number in (0, 60.0]"),
    ({**START, "seconds": True}, "seconds=True must be a number"),
    ({"type": "start", "prompt": PROMPT}, "give seconds"),
    ({**START, "endless": True}, "give seconds or endless=true, not both"),
    ({"type": "start", "prompt": PROMPT, "endless": "yes"}, "endless='yes' must be true or false"),
    ({**START, "seed": -1}, "seed=-1 must be an integer in [0, 2147483647]"),
    ({**START, "seed": 2**31}, "seed=2147483648 must be an integer"),
    ({**START, "seed": 1.5}, "seed=1.5 must be an integer"),
    ({**START, "seed": True}, "seed=True must be an integer"),
    (
        {**START, "schedule": "turbo"},
        "schedule='turbo' is not allowed; allowed: ['diagonal', 'diagonal-5to2'",
    ),
    ({**START, "path": "/etc/passwd"}, "unknown field 'path' in a 'start' message"),
    ({"type": "dance"}, "unknown message type 'dance'; allowed: ['start', 'prompt', 'stop']"),
    ({"prompt": PROMPT}, "unknown message type None"),
    ({"type": "prompt", "prompt": PROMPT}, "no stream is running"),
    ({"type": "stop"}, "no stream is running"),
    ("not json", "message is not JSON"),
    ('{"type": "start", "seconds": NaN, "prompt": "a red circle"}', "seconds=nan must be a number"),
    ("[1, 2]", "message must be a JSON object, not list"),
    (b"\x00\x01binary", "binary message of 8 bytes ignored; send JSON text messages"),
]


def test_every_bad_input_gets_an_error_and_the_connection_keeps_working(pipe):
    with serving(pipe, messages_per_second=1000, message_burst=1000) as (client, app):
        with client.websocket_connect("/ws") as ws:
            hello(ws)
            for message, expected in BAD:
                if isinstance(message, bytes):
                    ws.send_bytes(message)
                else:
                    ws.send_text(message if isinstance(message, str) else json.dumps(message))
                reply = ws.receive_json()
                assert reply["type"] == "error" and expected in reply["message"], (message, reply)
            start(ws, seconds=0.5)
            messages, frames = read_until_done(ws)
            assert messages[-1]["reason"] == "finished" and len(frames) == 13
        assert client.get("/health").json()["ok"] is True
        assert app.state.runner.snapshot()["counts"]["submitted"] == 1


def test_bad_prompt_switch_is_refused_and_the_stream_goes_on(pipe):
    with serving(pipe, lead_seconds=0.2) as (client, _app), client.websocket_connect("/ws") as ws:
        hello(ws)
        start(ws, seconds=1)
        ws.send_json({"type": "prompt", "prompt": "a purple circle"})
        ws.send_json({"type": "start", "prompt": PROMPT, "seconds": 1})
        messages, _ = read_until_done(ws)
    errors = [m["message"] for m in of_type(messages, "error")]
    assert any("unknown word 'purple'" in e for e in errors)
    assert any("a stream is already running" in e for e in errors)
    assert messages[-1]["reason"] == "finished" and {c["prompt"] for c in of_type(messages, "chunk")} == {
        PROMPT
    }


def test_oversized_message(pipe):
    with serving(pipe, max_message_bytes=1000) as (client, _app), client.websocket_connect("/ws") as ws:
        hello(ws)
        raw = json.dumps({**START, "prompt": "a" * 5000})
        ws.send_text(raw)
        reply = ws.receive_json()
        assert reply == {
            "type": "error",
            "message": f"message of {len(raw)} bytes is over the limit of 1000 bytes",
        }
        start(ws, seconds=0.5)
        assert read_until_done(ws)[0][-1]["reason"] == "finished"


def test_message_rate_limit(pipe):
    with (
        serving(pipe, messages_per_second=0.5, message_burst=3) as (client, _app),
        client.websocket_connect("/ws") as ws,
    ):
        hello(ws)
        for _ in range(6):
            ws.send_json({"type": "stop"})
        replies = [ws.receive_json()["message"] for _ in range(4)]
        assert replies[:3] == ["no stream is running; nothing to stop"] * 3
        assert "too many messages: the limit is 0.5 a second (bursts of 3)" in replies[3]
        ws.send_json({"type": "stop"})  # still dropped (no token yet), and no second warning within a second
        assert client.get("/health").json()["ok"] is True


def test_foreign_origin_is_refused(pipe):
    with serving(pipe, allowed_origins=("https://demo.example.org",)) as (client, _app):
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            client.websocket_connect("/ws", headers={"origin": "https://evil.example"}),
        ):
            pass
        assert refused.value.code == 1008
        for origin in ("http://testserver", "https://demo.example.org"):
            with client.websocket_connect("/ws", headers={"origin": origin}) as ws:
                hello(ws)


# ----- files -------------------------------------------------------------------------------------------------


def test_no_client_path_reaches_the_file_system(pipe):
    with serving(pipe) as (client, app):
        store = app.state.store
        planted = "A" * 22  # a well-formed id whose file exists but was never published
        (store.folder / f"{planted}.mp4").write_bytes(b"not served")
        for url in (
            f"/videos/{planted}.mp4",
            "/videos/..%2F..%2Fpyproject.toml.mp4",
            "/videos/%2Fetc%2Fpasswd.mp4",
            "/videos/../../etc/passwd",
            "/static/index.html",
            "/pyproject.toml",
            "/docs",
            "/openapi.json",
        ):
            response = client.get(url)
            assert response.status_code == 404, url
            assert b"not served" not in response.content and b"root:" not in response.content
        page = client.get("/")
        assert page.status_code == 200 and 'id="error"' in page.text and "<canvas" in page.text
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        assert not re.search(r"(src|href)\s*=\s*[\"'][a-z]*:?//", page.text)  # nothing from elsewhere


def test_finished_videos_are_capped(pipe):
    with serving(pipe, max_videos=2) as (client, app), client.websocket_connect("/ws") as ws:
        hello(ws)
        urls = []
        for seed in range(3):
            start(ws, seconds=0.5, seed=seed)
            urls.append(read_until_done(ws)[0][-1]["video"])
        assert [client.get(u).status_code for u in urls] == [404, 200, 200]
        assert len(list(app.state.store.folder.glob("*.mp4"))) == 2


def test_settings_are_checked():
    with pytest.raises(ValueError, match="frame_format='gif'; allowed"):
        ServeSettings(frame_format="gif")
    with pytest.raises(ValueError, match="schedules=\\('turbo',\\)"):
        ServeSettings(schedules=("turbo",))
    with pytest.raises(ValueError, match="max_queue=0 must be an int >= 1"):
        ServeSettings(max_queue=0)


# ----- the command -------------------------------------------------------------------------------------------


def test_cli_serve_without_a_trained_model_exits_with_the_reason(tmp_path, monkeypatch):
    import diagvid.pretrained as pretrained
    from diagvid.cli import app

    (tmp_path / "toy" / "vae").mkdir(parents=True)  # a bundled folder with a codec but no generator
    monkeypatch.setattr(pretrained, "ASSETS", tmp_path)
    result = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2
    assert "no trained generator yet" in " ".join(result.output.split())


def test_cli_serve_warns_when_exposed(pipe, tmp_path, monkeypatch):
    import uvicorn

    from diagvid.cli import app
    from diagvid.pretrained import save_pipeline

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    folder = save_pipeline(pipe, tmp_path / "tiny")
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--model", str(folder), "--device", "cpu", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: listening on 0.0.0.0" in text and "TLS" in text and "rate limits" in text
    assert calls[0]["host"] == "0.0.0.0" and calls[0]["port"] == 8000
    quiet = runner.invoke(app, ["serve", "--model", str(folder), "--device", "cpu", "--max-queue", "2"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    bad = runner.invoke(app, ["serve", "--model", str(folder), "--frame-format", "gif"])
    assert bad.exit_code == 2 and "frame_format='gif'" in bad.output


def test_overlapped_decode_serves_the_same_frames_and_stops_its_worker_with_the_server(pipe):
    """A pipeline that decodes in a worker process (serve --overlap-decode) sends exactly the in-line
    frames, a stream stopped half-way leaves nothing behind for the next one, and shutting the app down
    stops the worker."""
    expected, _ = pipe.generate(PROMPT, num_chunks=3, seed=5, schedule="diagonal")
    pipe.config.overlap_decode = True
    worker = pipe.start_decode_worker()
    with serving(pipe) as (client, app):
        with client.websocket_connect("/ws") as ws:
            hello(ws)
            start(ws, seconds=2, seed=9)
            assert ws.receive_json()["type"] == "started"
            first = ws.receive_json()
            [ws.receive_bytes() for _ in range(first["frames"])]
            ws.send_json({"type": "stop"})  # abandoned with a chunk still in the worker
            read_until_done(ws)
            start(ws, seconds=1, seed=5, schedule="diagonal")
            messages, frames = read_until_done(ws)
        wait_idle(app)
        assert pipe._worker is worker and worker.alive  # one worker for every stream
    assert messages[-1]["reason"] == "finished"
    assert np.array_equal(decode(frames), expected)
    assert pipe._worker is None and not worker.alive


def test_cli_serve_overlap_decode_starts_the_worker_and_stops_it_on_exit(pipe, tmp_path, monkeypatch):
    import uvicorn

    from diagvid.cli import app
    from diagvid.model.fp8 import FP8Linear
    from diagvid.pretrained import save_pipeline

    seen = []

    def run(app, **kw):
        pipeline = app.state.runner.pipeline
        seen.append((pipeline, pipeline._worker, pipeline._worker.alive))

    monkeypatch.setattr(uvicorn, "run", run)
    folder = save_pipeline(pipe, tmp_path / "tiny")
    args = ["serve", "--model", str(folder), "--device", "cpu", "--overlap-decode"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ((served, worker, alive_while_serving),) = seen
    assert served.config.overlap_decode and alive_while_serving  # started before the first client
    assert served._worker is None and not worker.alive  # and stopped with the server
    assert not any(isinstance(m, FP8Linear) for m in served.generator.modules())
    seen.clear()
    assert CliRunner().invoke(app, [*args, "--fp8"]).exit_code == 0
    ((served, _, _),) = seen
    assert any(isinstance(m, FP8Linear) for m in served.generator.modules())  # --fp8: float8 blocks
    bad = CliRunner().invoke(app, [*args, "--decode-threads", "0"])
    assert bad.exit_code == 2 and "--decode-threads=0 must be >= 1" in bad.output


# ----- backpressure ------------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("ahead", [1, 2])
def test_generation_waits_for_the_client_to_take_its_frames(pipe, ahead):
    from diagvid.serve.protocol import StartRequest
    from diagvid.serve.runner import Job, Runner
    from diagvid.serve.videos import VideoStore

    settings = ServeSettings(**FAST, chunks_ahead=ahead, stall_seconds=1.0)
    store = VideoStore(settings.max_videos)
    runner = Runner(pipe, settings, store)
    got = []
    job = Job(StartRequest(PROMPT, None, 0, "diagonal"), got.append, settings.chunks_ahead)
    try:
        runner.submit(job)
        wait_for(lambda: len([g for g in got if g.message["type"] == "chunk"]) == ahead)
        time.sleep(0.3)  # a client that takes nothing: no chunk beyond the credits is even started
        assert len(pipe.chunk_starts) == ahead and not job.ended.is_set()
        next(g for g in got if g.message["type"] == "chunk").sent()  # the client took chunk 0
        wait_for(lambda: len(pipe.chunk_starts) == ahead + 1)
        wait_for(job.ended.is_set)  # then nothing for stall_seconds: the stream is dropped
        assert got[-1].message["reason"] == "stalled" and len(pipe.chunk_starts) == ahead + 1
    finally:
        runner.close()
        store.close()


class FailingPipeline(Pipeline):
    """Yields one chunk, then fails like the engine does on NaN latents (or with an unexpected error)."""

    error: Exception = FloatingPointError("chunk 1 produced NaN or Inf latents")

    def stream(self, *args, **kwargs):
        inner = super().stream(*args, **kwargs)
        yield next(inner)
        raise self.error


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (FloatingPointError("chunk 1 produced NaN or Inf latents"), "chunk 1 produced NaN or Inf latents"),
        (RuntimeError("CUDA out of memory"), "internal error (RuntimeError); the stream was stopped"),
    ],
)
def test_a_failing_stream_is_reported_and_the_server_goes_on(pipe, error, shown):
    broken = FailingPipeline(pipe.generator, pipe.vae, pipe.text_encoder, pipe.config)
    broken.error = error
    with serving(broken) as (client, app), client.websocket_connect("/ws") as ws:
        hello(ws)
        start(ws, seconds=1)
        messages, frames = read_until_done(ws)
        assert of_type(messages, "error") == [{"type": "error", "message": shown}]
        assert messages[-1]["reason"] == "error" and messages[-1]["video"] is None and len(frames) == 5
        assert client.get("/health").json()["ok"] is True
        start(ws, seconds=1)  # the same connection, the same worker, a new stream
        assert read_until_done(ws)[0][-1]["reason"] == "error"
        assert app.state.runner.snapshot()["counts"]["failed"] == 2 and len(app.state.store) == 0
