"""A bounded load test on loopback: a real uvicorn server, 20 concurrent websocket clients, some leaving early."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from websockets.asyncio.client import connect

from diagvid.serve import ServeSettings, create_app
from diagvid.stream import Pipeline, StreamConfig
from tests.serve_server import running_server

PROMPT = "a red circle moves left"
CLIENTS = 20


async def client(url: str, seed: int, leave: str | None) -> dict:
    """One viewer of a 2-chunk stream; `leave` = "queued" or "streaming" disconnects at that point."""
    frames: list[np.ndarray] = []
    async with connect(url, max_size=1 << 20, open_timeout=20) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        await ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seconds": 0.5, "seed": seed}))
        if leave == "queued":
            return {"seed": seed, "left": True}
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "chunk":
                if leave == "streaming":
                    return {"seed": seed, "left": True}
                for _ in range(msg["frames"]):
                    frames.append(np.asarray(Image.open(io.BytesIO(await ws.recv())).convert("RGB")))
            elif msg["type"] == "done":
                return {"seed": seed, "left": False, "reason": msg["reason"], "frames": frames}
            elif msg["type"] in ("error", "refused"):
                raise AssertionError(f"client {seed}: {msg}")


async def crowd(address: str) -> list[dict]:
    plan = [("queued" if i % 7 == 3 else "streaming" if i % 5 == 0 else None) for i in range(CLIENTS)]
    tasks = [client(f"ws://{address}/ws", seed, leave) for seed, leave in enumerate(plan)]
    return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)


def test_twenty_clients_on_loopback(_tiny_pipeline_models):
    m = _tiny_pipeline_models
    pipe = Pipeline(m.generator, m.vae, m.text_encoder, StreamConfig(frames_per_chunk=2, latent_hw=(4, 4)))
    expected = {seed: pipe.generate(PROMPT, num_chunks=2, seed=seed)[0] for seed in range(CLIENTS)}
    app = create_app(pipe, ServeSettings(max_queue=CLIENTS, frame_format="png", lead_seconds=None))
    with running_server(app) as address:
        # round 1 warms every pool up; the resident set after round 2 must be back near that baseline
        asyncio.run(crowd(address))
        drained(address, app)
        baseline = resident_mb()
        t0 = time.monotonic()
        results = asyncio.run(crowd(address))
        elapsed = time.monotonic() - t0
        health = drained(address, app)
        grown = resident_mb() - baseline
        print(f"resident memory after round 2: {grown:+.1f} MB against round 1")
        assert health["ok"] is True and grown < 40, f"resident memory grew {grown:.1f} MB over a second round"
        counts = app.state.runner.snapshot()["counts"]
    completed = [r for r in results if not r["left"]]
    assert len(completed) == CLIENTS - sum(r["left"] for r in results) >= 12
    for r in completed:
        assert r["reason"] == "finished"
        assert np.array_equal(np.stack(r["frames"]), expected[r["seed"]]), f"client {r['seed']}"
    assert counts["submitted"] == 2 * CLIENTS and counts["finished"] + counts["stopped"] == 2 * CLIENTS
    assert counts["finished"] >= len(completed) and counts["failed"] == 0
    assert elapsed < 60


def drained(address: str, app) -> dict:
    """Wait until the server has no client, queue or stream left (the ones that left included)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(f"http://{address}/health", timeout=5).json()
        if health["queue_length"] == 0 and health["active_stream"] is None and health["clients"] == 0:
            break
        time.sleep(0.05)
    assert health["clients"] == 0 and health["queue_length"] == 0 and health["active_stream"] is None, health
    assert not app.state.sessions
    return health


def resident_mb() -> float:
    """This process's resident set (the server runs in a thread of it), after a garbage collection."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
