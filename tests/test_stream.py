"""The streaming engine: equivalences, determinism, NFE, prompt switching, decode, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diagvid.model.vae import tensor_to_frames
from diagvid.stream import parse_timeline
from tests.conftest import make_tiny_pipeline

PROMPT = "a red circle moves left"


def test_stream_equals_generate_and_seed_is_reproducible(tiny_pipeline):
    chunks = list(tiny_pipeline.stream(PROMPT, num_chunks=3, seed=7))
    streamed = np.concatenate([c.frames for c in chunks])
    again, _ = tiny_pipeline.generate(PROMPT, num_chunks=3, seed=7)
    other, _ = tiny_pipeline.generate(PROMPT, num_chunks=3, seed=8)
    assert streamed.dtype == np.uint8 and streamed.shape == (1 + 4 * 5, 16, 16, 3)
    assert np.array_equal(streamed, again)
    assert not np.array_equal(streamed, other)
    # chunk 0 of 2 latent frames decodes to 5 pixel frames, later chunks to 8
    assert [len(c.frames) for c in chunks] == [5, 8, 8]
    assert [c.first_frame for c in chunks] == [0, 5, 13]


def test_streaming_decode_equals_decoding_everything_at_once(tiny_pipeline):
    chunks = list(tiny_pipeline.stream(PROMPT, num_chunks=3, seed=1))
    latents = torch.cat([c.latents for c in chunks], dim=2)
    whole = tensor_to_frames(tiny_pipeline.vae.decode(latents)[0])
    streamed = np.concatenate([c.frames for c in chunks])
    assert np.abs(whole.astype(int) - streamed.astype(int)).max() <= 1  # rounding at the uint8 boundary


@pytest.mark.parametrize(("schedule", "nfe"), [("diagonal", 18), ("self-forcing", 35), ("causvid", 28)])
def test_engine_counts_forwards(tiny_pipeline, schedule, nfe):
    chunks = list(tiny_pipeline.stream(PROMPT, num_chunks=7, schedule=schedule))
    assert sum(c.nfe for c in chunks) == nfe
    if schedule == "diagonal":
        assert [c.nfe for c in chunks] == [5, 3, 2, 2, 2, 2, 2]


def test_noisy_and_clean_context_give_different_videos(tiny_pipeline):
    noisy, _ = tiny_pipeline.generate(PROMPT, num_chunks=3, schedule="diagonal", seed=3)
    clean, chunks = tiny_pipeline.generate(PROMPT, num_chunks=3, schedule="diagonal", context="clean", seed=3)
    assert sum(c.nfe for c in chunks) == 5 + 4 + 3
    # chunk 0 is identical (same steps, nothing before it); later chunks see a different context
    assert np.array_equal(noisy[:5], clean[:5])
    assert not np.array_equal(noisy[5:], clean[5:])


def test_prompt_switch_keeps_earlier_frames_and_changes_later_ones(tiny_pipeline):
    base, _ = tiny_pipeline.generate(PROMPT, num_chunks=4, seed=5)
    # chunk 2 starts at pixel frame 13 = 0.8125 s
    switched, chunks = tiny_pipeline.generate([PROMPT, "@0.8s a blue square moves up"], num_chunks=4, seed=5)
    assert [c.prompt for c in chunks] == [PROMPT, PROMPT, "a blue square moves up", "a blue square moves up"]
    assert np.array_equal(base[:13], switched[:13])
    assert not np.array_equal(base[13:], switched[13:])


def test_live_prompt_source_switches_like_the_timeline(tiny_pipeline):
    new = "a blue square moves up"
    asked = []

    def source(index: int) -> str | None:
        asked.append(index)
        return new if index == 2 else None  # None afterwards: the switched prompt stays

    base, _ = tiny_pipeline.generate(PROMPT, num_chunks=4, seed=5)
    live, chunks = tiny_pipeline.generate(PROMPT, num_chunks=4, seed=5, prompt_source=source)
    timed, _ = tiny_pipeline.generate([PROMPT, f"@0.8s {new}"], num_chunks=4, seed=5)
    assert asked == [0, 1, 2, 3]
    assert [c.prompt for c in chunks] == [PROMPT, PROMPT, new, new]
    assert np.array_equal(base[:13], live[:13])  # chunk 2 starts at pixel frame 13
    assert not np.array_equal(base[13:], live[13:])
    assert np.array_equal(live, timed)
    # a source repeating the current prompt or returning blanks changes nothing
    same, _ = tiny_pipeline.generate(
        PROMPT, num_chunks=4, seed=5, prompt_source=lambda i: [PROMPT, " "][i % 2]
    )
    assert np.array_equal(same, base)
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        tiny_pipeline.generate(PROMPT, num_chunks=2, prompt_source=lambda i: "a purple circle" if i else None)


def test_rolling_window_runs_past_the_capacity_with_a_fixed_cache(monkeypatch):
    pipe = make_tiny_pipeline(window_frames=4, sink_frames=1)
    caches = []
    original = pipe.generator.new_cache

    def spy(**kw):
        caches.append(original(**kw))
        return caches[-1]

    monkeypatch.setattr(pipe.generator, "new_cache", spy)
    chunks = list(pipe.stream(PROMPT, num_chunks=10, seed=0))
    assert len(chunks) == 10
    (cache,) = caches
    assert cache.capacity_frames == 4 and cache.num_frames == 4 and cache.evicted_frames == 20 - 4
    assert cache.slot_frames[0] == 0  # the sink survives


def test_rope_cache_mode_streams_the_same_until_eviction():
    a, _ = make_tiny_pipeline(window_frames=4).generate(PROMPT, num_chunks=4, seed=2)
    b, _ = make_tiny_pipeline(window_frames=4, rope="cache").generate(PROMPT, num_chunks=4, seed=2)
    assert np.array_equal(a[:13], b[:13])  # chunks 0 and 1 fill the window: identical positions


def test_image_to_video_starts_from_the_given_frame(tiny_pipeline):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    chunks = list(tiny_pipeline.stream(PROMPT, num_chunks=2, image=image))
    assert chunks[0].index == -1 and len(chunks[0].frames) == 1
    vae = tiny_pipeline.vae
    x = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    expect = tensor_to_frames(vae.decode(vae.encode(x))[0])
    assert np.array_equal(chunks[0].frames, expect)
    assert [len(c.frames) for c in chunks] == [1, 8, 8]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seconds": 0}, "seconds=0 must be"),
        ({"seconds": -1.0}, "must be a finite number > 0"),
        ({"seconds": float("nan")}, "must be a finite number"),
        ({"schedule": "turbo"}, "unknown schedule 'turbo'"),
        ({"schedule": "1000,357,500"}, "not strictly decreasing"),
        ({"num_chunks": 0}, "num_chunks=0"),
        ({"num_chunks": 2, "schedule": "1000,500;1000,400;1000,300"}, "lists 3 chunks but the video has 2"),
        ({"context": "dirty"}, "context='dirty'"),
        ({"seed": -1}, r"seed=-1 must be an int in \[0, 2\*\*63\)"),
        ({"seed": "3"}, "seed='3' must be an int"),
        ({"image": np.zeros((8, 8, 3), np.uint8)}, r"image must be uint8 frames of size \(16, 16\)"),
        ({"image": np.zeros((16, 16, 3), np.float32)}, "image must be uint8"),
        ({"continue_from": np.zeros((5, 16, 16, 4), np.uint8)}, "continue_from must be uint8 frames"),
        ({"video": np.zeros((5, 16, 16, 3), np.uint8), "strength": 0}, "strength=0 must be in"),
        ({"video": np.zeros((5, 16, 16, 3), np.uint8), "seconds": 2}, "takes its length from the video"),
        ({"video": np.zeros((4, 16, 16, 3), np.uint8)}, "needs at least 5"),
        (
            {"video": np.zeros((5, 16, 16, 3), np.uint8), "image": np.zeros((16, 16, 3), np.uint8)},
            "at most one",
        ),
    ],
)
def test_bad_arguments_fail_before_any_compute(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(iter(tiny_pipeline.stream(PROMPT, **kwargs)))
    assert tiny_pipeline.generator.stats.forwards == 0


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ("", "prompt 0 is empty"),
        ("   ", "prompt 0 is empty"),
        ([], "no prompt given"),
        (["a", "b"], "has no start time"),
        (["a", "@x b"], "bad time"),
        (["a", "@3s b", "@2s c"], "strictly increasing"),
        (["@1s a"], "first prompt must start at 0"),
        ("red " * 1000, "has 3999 characters .* the limit is 2000"),
        ("a red\x00 circle", r"control character '\\x00'"),
        (["a", "@2s b\x1b[31m"], "prompt 1 .* control character"),
    ],
)
def test_bad_timelines(prompts, message):
    with pytest.raises(ValueError, match=message):
        parse_timeline(prompts)


def test_timeline_parsing():
    events = parse_timeline(["a red circle moves left", "@4s a blue square moves up", "@6.5 b"])
    assert [(e.at_seconds, e.prompt) for e in events] == [
        (0.0, "a red circle moves left"),
        (4.0, "a blue square moves up"),
        (6.5, "b"),
    ]


def test_num_chunks_from_seconds(tiny_pipeline):
    from diagvid.stream import StreamConfig

    tiny_pipeline.config = StreamConfig(frames_per_chunk=3, fps=16)
    assert tiny_pipeline.num_chunks(5.0) == 7  # 80 frames -> 21 latent frames -> 7 chunks of 3
    assert tiny_pipeline.num_chunks(10.0) == 14
    assert tiny_pipeline.num_chunks(0.01) == 1


def test_continuation_encodes_the_clip_and_goes_on(tiny_pipeline):
    clip, _ = tiny_pipeline.generate(PROMPT, num_chunks=2, seed=0)  # 13 frames
    chunks = list(tiny_pipeline.stream(PROMPT, num_chunks=2, continue_from=clip[:12], seed=1))
    # the last 1 + 4k = 9 of the 12 frames are kept: 3 latent frames, pushed as pieces of 2 and 1
    assert chunks[0].index == -1 and len(chunks[0].frames) == 9 and chunks[0].nfe == 2
    assert [c.first_frame for c in chunks] == [0, 9, 17]
    assert [len(c.frames) for c in chunks] == [9, 8, 8]


def test_video_to_video_follows_the_input_chunk_by_chunk(tiny_pipeline):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (17, 16, 16, 3), dtype=np.uint8)  # 5 latent frames -> 2 chunks of 2
    chunks = list(tiny_pipeline.stream(PROMPT, video=video, strength=0.6, schedule="diagonal", seed=0))
    assert [c.timesteps for c in chunks] == [(600.0, 357), (600.0, 357)]
    assert [c.nfe for c in chunks] == [3, 2]  # chunk 0 keeps its clean context pass
    other = video.copy()
    other[9:] = 255 - other[9:]  # change only what chunk 1 reads (pixel frames 5..12 and later)
    changed = list(tiny_pipeline.stream(PROMPT, video=other, strength=0.6, schedule="diagonal", seed=0))
    assert np.array_equal(chunks[0].frames, changed[0].frames)
    assert not np.array_equal(chunks[1].frames, changed[1].frames)


def test_static_shape_cache_streams_the_same_video():
    """Fixed-shape KV buffers attend over masked slots, so sums run in another order: the latents agree to
    float rounding (about 1e-6 of values near 4), which may flip a pixel by one level after decoding."""
    streams = [
        list(
            make_tiny_pipeline(window_frames=4, sink_frames=1, static_shapes=s).stream(
                PROMPT, num_chunks=4, seed=0
            )
        )
        for s in (False, True)
    ]
    for a, b in zip(*streams, strict=True):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


def test_nan_in_a_chunk_is_reported_with_its_index_and_never_decoded():
    pipe = make_tiny_pipeline(seed=4)
    good, _ = pipe.generate(PROMPT, num_chunks=1, seed=0)
    chunks = []
    with pytest.raises(FloatingPointError, match=r"chunk 1 produced NaN or Inf latents"):
        for i, chunk in enumerate(pipe.stream(PROMPT, num_chunks=3, seed=0)):
            chunks.append(chunk)
            if i == 0:  # from chunk 1 on, the head emits NaN
                with torch.no_grad():
                    pipe.generator.head.head.bias.fill_(float("nan"))
    assert len(chunks) == 1 and np.array_equal(chunks[0].frames, good)
