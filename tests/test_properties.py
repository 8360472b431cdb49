"""Property tests: schedule parsing, KV-cache slot arithmetic, config round trips, streaming == one-shot."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagvid.model.cache import KVCache
from diagvid.model.dit import DiTConfig
from diagvid.sampling import Schedule, get_schedule, parse_steps

steps_list = st.lists(st.integers(1, 1000), min_size=1, max_size=6, unique=True).map(
    lambda xs: tuple(sorted(xs, reverse=True))
)


@given(st.lists(steps_list, min_size=1, max_size=5))
def test_valid_step_strings_round_trip(lists):
    text = ";".join(",".join(str(t) for t in chunk) for chunk in lists)
    sched = get_schedule(text)
    assert sched.steps == tuple(tuple(float(t) for t in chunk) for chunk in lists)
    for k in range(len(lists) + 3):
        assert sched.chunk_steps(k) == sched.steps[min(k, len(lists) - 1)]


@given(st.text(max_size=40))
def test_any_string_either_parses_to_a_valid_schedule_or_raises_value_error(text):
    try:
        sched = Schedule("x", parse_steps(text), ("clean",))
    except ValueError:
        return
    assert all(0 < t <= 1000 for chunk in sched.steps for t in chunk)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 12),
    sink=st.integers(0, 11),
    chunk_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=30),
    rope=st.sampled_from(["absolute", "cache"]),
    rewrites=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_cache_slots_hold_the_sink_and_the_most_recent_frames(capacity, sink, chunk_sizes, rope, rewrites):
    shape = {"num_layers": 1, "batch_size": 1, "num_heads": 1, "head_dim": 6, "tokens_per_frame": 1}
    if sink >= capacity:
        with pytest.raises(ValueError):
            KVCache(**shape, capacity_frames=capacity, sink_frames=sink)
        return
    cache = KVCache(**shape, capacity_frames=capacity, sink_frames=sink, rope=rope)
    written = 0
    for size, rewrite in zip(chunk_sizes, rewrites, strict=False):
        if size > capacity - sink:
            with pytest.raises(ValueError, match="does not fit"):
                cache.prepare(written, size)
            continue
        slots = cache.prepare(written, size)
        if rewrite:  # a second forward of the same chunk overwrites, never appends
            assert cache.prepare(written, size) == slots
        written += size
        held = cache.slot_frames
        assert len(held) <= capacity and held[-1] == written - 1
        assert held[: min(sink, len(held))] == list(range(min(sink, len(held))))
        window = held[min(sink, len(held)) :]
        if window:  # contiguous up to the newest frame; when full, exactly the most recent ones
            assert window == list(range(window[0], written))
            if len(held) == capacity:
                assert window[0] == written - (capacity - sink)
        assert slots.end_slot == len(held)
        assert slots.rope_frame == (written - size if rope == "absolute" else slots.start_slot)
        if rope == "cache":
            assert slots.rope_frame >= 0 and slots.rope_frame + size <= capacity


@given(
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([6, 8, 16, 32]),
    layers=st.integers(1, 3),
    patch=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
)
def test_dit_config_round_trips_through_json_dicts(heads, head_dim, layers, patch):
    cfg = DiTConfig(dim=heads * head_dim, ffn_dim=8, num_heads=heads, num_layers=layers, patch_size=patch)
    again = DiTConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.head_dim == head_dim


def test_cache_buffers_never_grow():
    cache = KVCache(
        num_layers=2,
        batch_size=1,
        num_heads=1,
        head_dim=6,
        tokens_per_frame=3,
        capacity_frames=4,
        sink_frames=1,
    )
    before = (cache.k.data_ptr(), cache.k.shape)
    for start in range(0, 40, 2):
        cache.prepare(start, 2)
        k = torch.randn(1, 6, 1, 6)
        cache.write_and_read(0, k, k)
    assert (cache.k.data_ptr(), cache.k.shape) == before


@pytest.fixture(scope="module")
def tiny_vae():
    from diagvid.model.vae import WanVAE
    from diagvid.model.vae import preset as vae_preset

    torch.manual_seed(0)
    return WanVAE(
        vae_preset("tiny", latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.2, 0.8, 1.0, 1.5])
    ).eval()


@settings(max_examples=12, deadline=None)
@given(pieces=st.lists(st.integers(1, 3), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_streaming_decode_equals_one_shot_over_random_chunkings(tiny_vae, pieces, seed):
    from diagvid.model.vae import StreamingDecoder

    z = torch.randn(1, 4, sum(pieces), 2, 2, generator=torch.Generator().manual_seed(seed))
    dec = StreamingDecoder(tiny_vae)
    parts, a = [], 0
    with torch.no_grad():
        whole = tiny_vae.decode(z)
        for n in pieces:
            parts.append(dec.decode(z[:, :, a : a + n]))
            a += n
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=1e-4)


@settings(max_examples=12, deadline=None)
@given(pieces=st.lists(st.integers(1, 6), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_streaming_encode_equals_one_shot_over_random_pieces(tiny_vae, pieces, seed):
    """Frames pushed in pieces of any size give the latents of the whole clip (1 + 4k frames of it)."""
    from diagvid.model.vae import StreamingEncoder

    total = sum(pieces)
    usable = 1 + 4 * ((total - 1) // 4)
    x = torch.rand(1, 3, total, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    enc = StreamingEncoder(tiny_vae)
    parts, a = [], 0
    with torch.no_grad():
        whole = tiny_vae.encode(x[:, :, :usable])
        for n in pieces:
            parts.append(enc.encode(x[:, :, a : a + n]))
            a += n
    assert enc.pending_frames == total - usable
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=1e-4)
