"""Prompt switch with KV re-cache (LongLive): the cached frames' K/V recomputed under the new prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diagvid.cli import app
from diagvid.model.vae import tensor_to_frames
from diagvid.pretrained import save_pipeline
from diagvid.sampling import get_schedule
from diagvid.stream import denoise_chunk
from tests.conftest import make_tiny_pipeline

OLD = "a red circle moves left"
NEW = "a blue square moves up"
SWITCH = [OLD, f"@0.8s {NEW}"]  # chunk 2 starts at pixel frame 13 = 0.8125 s (2 latent frames a chunk)
POLICIES = ["diagonal", "self-forcing"]  # noisy context (last denoising forward) and clean context pass


class Spy:
    """Records every cached generator forward (start frame, input, timesteps) and snapshots the cache the
    first time a forward starts at `snap_at` (before it writes: the state the switch left)."""

    def __init__(self, model, snap_at: int | None = None) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.snap_at, self.snap = snap_at, None
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs) -> None:
        cache, start = kwargs.get("cache"), kwargs.get("start_frame", 0)
        if cache is None:
            return
        if start == self.snap_at and self.snap is None:
            used = cache.num_frames * cache.tokens_per_frame
            self.snap = {
                "k": cache.k[:, :, :used].clone(),
                "v": cache.v[:, :, :used].clone(),
                "slot_frames": list(cache.slot_frames),
                "evicted": cache.evicted_frames,
                "next_frame": cache.next_frame,
            }
        self.calls.append((start, args[0].clone(), args[1].clone()))

    def writes_before_switch(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The last forward at each start frame before the first one that goes back (the re-cache)."""
        last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        previous = -1
        for start, x, t in self.calls:
            if start < previous:
                break
            last[start], previous = (x, t), start
        return last

    def remove(self) -> None:
        self.handle.remove()


def new_ctx(pipe, prompt: str) -> torch.Tensor:
    return pipe.text_encoder.encode([prompt])[0]


def fresh_cache(pipe, capacity: int):
    cfg = pipe.config
    return pipe.generator.new_cache(
        batch_size=1,
        latent_hw=cfg.latent_hw,
        capacity_frames=capacity,
        sink_frames=cfg.sink_frames,
        rope=cfg.rope,
    )


def run(pipe, prompts, **kwargs):
    frames, chunks = pipe.generate(prompts, **kwargs)
    return frames, chunks, torch.cat([c.latents for c in chunks], dim=2)


@pytest.mark.parametrize("schedule", POLICIES)
def test_recache_keeps_earlier_frames_and_counts_its_forwards(schedule):
    pipe = make_tiny_pipeline()
    plain, plain_chunks, _ = run(pipe, SWITCH, num_chunks=4, seed=5, schedule=schedule)
    frames, chunks, _ = run(pipe, SWITCH, num_chunks=4, seed=5, schedule=schedule, recache=True)
    assert np.array_equal(frames[:13], plain[:13])  # chunks 0 and 1 come before the switch
    assert not np.array_equal(frames[13:], plain[13:])  # the re-cached context changes what follows
    assert [c.recache_nfe for c in chunks] == [0, 0, 2, 0]  # chunks 0 and 1 replayed once
    assert [c.nfe - c.recache_nfe for c in chunks] == [c.nfe for c in plain_chunks]
    assert [c.prompt for c in chunks] == [OLD, OLD, NEW, NEW]


@pytest.mark.parametrize("schedule", POLICIES)
def test_recache_equals_replaying_the_cached_forwards_under_the_new_prompt(schedule):
    pipe = make_tiny_pipeline()
    spy = Spy(pipe.generator, snap_at=4)  # chunk 2 starts at latent frame 4
    try:
        pipe.generate(SWITCH, num_chunks=3, seed=5, schedule=schedule, recache=True)
    finally:
        spy.remove()
    writes = spy.writes_before_switch()
    assert sorted(writes) == [0, 2]
    # chunk 0 always ends with a clean context pass (t = 0); under the diagonal schedule chunk 1 keeps the
    # K/V of its last denoising forward (t = 357, a noisy input)
    assert (writes[0][1] == 0).all()
    assert (writes[2][1] == (0 if schedule == "self-forcing" else 357)).all()
    # reference: the same forwards with the new prompt, chunk by chunk, in a fresh cache
    ref = fresh_cache(pipe, capacity=6)
    ctx = new_ctx(pipe, NEW)
    with torch.no_grad():
        for start, (x, t) in sorted(writes.items()):
            pipe.generator(x, t, ctx, cache=ref, start_frame=start)
    used = ref.num_frames * ref.tokens_per_frame
    assert spy.snap["slot_frames"] == ref.slot_frames == [0, 1, 2, 3]
    assert torch.equal(spy.snap["k"], ref.k[:, :, :used])
    assert torch.equal(spy.snap["v"], ref.v[:, :, :used])
    # the same forwards under the old prompt give other K/V: the check can fail
    old = fresh_cache(pipe, capacity=6)
    with torch.no_grad():
        for start, (x, t) in sorted(writes.items()):
            pipe.generator(x, t, new_ctx(pipe, OLD), cache=old, start_frame=start)
    assert not torch.equal(spy.snap["k"], old.k[:, :, :used])


@pytest.mark.parametrize("schedule", POLICIES)
@pytest.mark.parametrize("start", ["noise", "image"])
def test_recache_under_an_equivalent_prompt_rebuilds_the_same_cache(schedule, start):
    """A switch to a prompt that encodes the same (case and punctuation differ) replays exactly the
    forwards that wrote the cache, so the video is bit-identical to no switch at all."""
    pipe = make_tiny_pipeline()
    image = (
        np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8) if start == "image" else None
    )
    same = "A red circle, moves left."
    assert torch.equal(new_ctx(pipe, same), new_ctx(pipe, OLD))
    base, _, base_latents = run(pipe, OLD, num_chunks=4, seed=3, schedule=schedule, image=image)
    switched, chunks, latents = run(
        pipe, [OLD, f"@0.8s {same}"], num_chunks=4, seed=3, schedule=schedule, image=image, recache=True
    )
    assert sum(c.recache_nfe for c in chunks) > 0
    assert torch.equal(latents, base_latents)
    assert np.array_equal(switched, base)


@pytest.mark.parametrize("schedule", POLICIES)
def test_recache_without_a_switch_changes_nothing(schedule):
    pipe = make_tiny_pipeline(window_frames=5, sink_frames=1)
    a, a_chunks, a_latents = run(pipe, OLD, num_chunks=5, seed=2, schedule=schedule)
    b, b_chunks, b_latents = run(pipe, OLD, num_chunks=5, seed=2, schedule=schedule, recache=True)
    assert np.array_equal(a, b) and torch.equal(a_latents, b_latents)
    assert [c.nfe for c in a_chunks] == [c.nfe for c in b_chunks]
    assert all(c.recache_nfe == 0 for c in b_chunks)
    # the config default is read when the call does not say
    c, _, _ = run(make_tiny_pipeline(recache=True), SWITCH, num_chunks=3, seed=2, schedule=schedule)
    d, _, _ = run(make_tiny_pipeline(), SWITCH, num_chunks=3, seed=2, schedule=schedule)
    e, _, _ = run(make_tiny_pipeline(), SWITCH, num_chunks=3, seed=2, schedule=schedule, recache=True)
    assert not np.array_equal(c, d) and np.array_equal(c, e)


def test_recache_with_a_rolling_window_and_an_absolute_sink():
    # window of 5 latent frames, 1 sink frame, chunks of 2: before chunk 4 the cache holds frames
    # [0, 4, 5, 6, 7] (frames 1, 2, 3 evicted); the switch replays chunk 0 (for its sink frame), 2 and 3
    pipe = make_tiny_pipeline(window_frames=5, sink_frames=1)
    timeline = [OLD, f"@1.8s {NEW}"]  # chunk 4 starts at pixel frame 29 = 1.81 s
    plain_spy = Spy(pipe.generator, snap_at=8)
    try:
        pipe.generate(timeline, num_chunks=6, seed=4, schedule="self-forcing")
    finally:
        plain_spy.remove()
    spy = Spy(pipe.generator, snap_at=8)
    try:
        _, chunks, _ = run(pipe, timeline, num_chunks=6, seed=4, schedule="self-forcing", recache=True)
    finally:
        spy.remove()
    assert [c.recache_nfe for c in chunks] == [0, 0, 0, 0, 3, 0]
    # the same layout as without re-cache: frames, evictions, next frame
    for key in ("slot_frames", "evicted", "next_frame"):
        assert spy.snap[key] == plain_spy.snap[key]
    assert spy.snap["slot_frames"] == [0, 4, 5, 6, 7] and spy.snap["evicted"] == 3
    writes = spy.writes_before_switch()
    ctx = new_ctx(pipe, NEW)
    tpf = pipe.generator.new_cache(batch_size=1, latent_hw=(4, 4), capacity_frames=1).tokens_per_frame
    with torch.no_grad():
        # the sink frame: chunk 0 alone under the new prompt
        sink_ref = fresh_cache(pipe, capacity=5)
        pipe.generator(*writes[0], ctx, cache=sink_ref, start_frame=0)
        assert torch.equal(spy.snap["k"][:, :, :tpf], sink_ref.k[:, :, :tpf])
        # everything: chunk 0, then the window's chunks 2 and 3 at their own frames
        ref = fresh_cache(pipe, capacity=5)
        pipe.generator(*writes[0], ctx, cache=ref, start_frame=0)
        ref.skip_to(4)
        pipe.generator(*writes[4], ctx, cache=ref, start_frame=4)
        pipe.generator(*writes[6], ctx, cache=ref, start_frame=6)
    used = 5 * tpf
    assert ref.slot_frames == spy.snap["slot_frames"] and ref.evicted_frames == 3
    assert torch.equal(spy.snap["k"], ref.k[:, :, :used]) and torch.equal(spy.snap["v"], ref.v[:, :, :used])


def test_recache_with_a_rolling_window_cache_rope_and_a_chunk_sized_sink():
    # rope="cache" rotates keys by slot, so the replay equals the kept forwards run back to back from
    # frame 0 in a fresh cache: an independent reference. Window 5, sink 2 = one chunk: before chunk 4
    # the cache holds [0, 1, 5, 6, 7]; chunks 0, 2 (for frame 5) and 3 are replayed.
    pipe = make_tiny_pipeline(window_frames=5, sink_frames=2, rope="cache")
    timeline = [OLD, f"@1.8s {NEW}", f"@2.8s {OLD}"]
    spy = Spy(pipe.generator, snap_at=8)
    try:
        frames, chunks, _ = run(pipe, timeline, num_chunks=8, seed=6, schedule="diagonal", recache=True)
    finally:
        spy.remove()
    assert len(frames) == 1 + 4 * 15 and np.isfinite(frames).all()
    assert [c.recache_nfe for c in chunks] == [0, 0, 0, 0, 3, 0, 3, 0]  # two switches, each replays 3
    assert spy.snap["slot_frames"] == [0, 1, 5, 6, 7]
    writes = spy.writes_before_switch()
    ctx = new_ctx(pipe, NEW)
    ref = fresh_cache(pipe, capacity=5)
    with torch.no_grad():
        for renumbered, start in enumerate((0, 4, 6)):
            pipe.generator(*writes[start], ctx, cache=ref, start_frame=2 * renumbered)
    assert ref.num_frames == 5
    used = 5 * ref.tokens_per_frame
    assert torch.equal(spy.snap["k"], ref.k[:, :, :used]) and torch.equal(spy.snap["v"], ref.v[:, :, :used])


@pytest.mark.parametrize("schedule", POLICIES)
def test_recache_off_is_the_plain_prompt_switch(schedule):
    """recache=False (the default) is the stream as it was: a switch resets only the text K/V. The
    reference is that loop written out with the public pieces."""
    pipe = make_tiny_pipeline()
    _, chunks, latents = run(pipe, SWITCH, num_chunks=4, seed=5, schedule=schedule, recache=False)
    _, _, default = run(pipe, SWITCH, num_chunks=4, seed=5, schedule=schedule)
    sched = get_schedule(schedule)
    gen = torch.Generator().manual_seed(5)
    cache = fresh_cache(pipe, capacity=8)
    decoder = pipe.vae.stream_decoder()
    out = []
    with torch.no_grad():
        for index in range(4):
            prompt = OLD if index < 2 else NEW
            if index == 2:
                cache.reset_text()
            noise = torch.randn(1, 4, 2, 4, 4, generator=gen)
            clean = sched.chunk_context(index) == "clean"
            x0 = denoise_chunk(
                pipe.generator,
                pipe.fm,
                noise,
                sched.chunk_steps(index),
                new_ctx(pipe, prompt),
                cache,
                2 * index,
                gen,
                context_t=sched.context_t if clean else None,
            )
            out.append(x0)
            assert np.array_equal(tensor_to_frames(decoder.decode(x0)[0]), chunks[index].frames)
    assert torch.equal(torch.cat(out, dim=2), latents) and torch.equal(default, latents)


def test_recache_rejects_a_non_bool():
    with pytest.raises(ValueError, match="recache='yes' must be True or False"):
        next(iter(make_tiny_pipeline().stream(OLD, num_chunks=1, recache="yes")))


def test_cli_recache_flag_reports_its_forwards(tmp_path):
    from typer.testing import CliRunner

    folder = save_pipeline(make_tiny_pipeline(), tmp_path / "tiny")
    base = ["generate", "--model", str(folder), "--device", "cpu", "--json", "--seconds", "1"]
    base += ["-p", OLD, "-p", f"@0.5s {NEW}", "--out", str(tmp_path / "x.gif")]
    runner = CliRunner()
    plain = runner.invoke(app, base)
    result = runner.invoke(app, [*base, "--recache"])
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    figures, plain_figures = json.loads(result.stdout), json.loads(plain.stdout)
    assert plain_figures["recache_nfe"] == 0
    # chunk 1 starts at pixel frame 5 (0.31 s), chunk 2 at 13 (0.81 s): the switch replays chunks 0 and 1
    assert [c["recache_nfe"] for c in figures["per_chunk"]] == [0, 0, 2]
    assert figures["recache_nfe"] == 2 and figures["nfe"] == plain_figures["nfe"] + 2


def test_cache_skip_to_drops_the_window_and_goes_on_at_a_later_frame(tiny_dit):
    cache = tiny_dit.new_cache(batch_size=1, latent_hw=(4, 4), capacity_frames=5, sink_frames=1)
    x = torch.zeros(1, 4, 2, 4, 4)
    ctx = torch.zeros(1, 6, 12)
    with torch.no_grad():
        tiny_dit(x, torch.zeros(1), ctx, cache=cache, start_frame=0)
        cache.skip_to(6)
        assert cache.slot_frames == [0] and cache.next_frame == 6 and cache.evicted_frames == 1 + 4
        with pytest.raises(ValueError, match="can only overwrite the last chunk"):
            tiny_dit(x, torch.zeros(1), ctx, cache=cache, start_frame=0)  # chunk 0's slots are gone
        tiny_dit(x, torch.zeros(1), ctx, cache=cache, start_frame=6)
    assert cache.slot_frames == [0, 6, 7] and cache.chunk.start_slot == 1
    with pytest.raises(ValueError, match=r"skip_to\(4\) goes back; the next frame is 8"):
        cache.skip_to(4)
