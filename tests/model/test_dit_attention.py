"""The three attention modes agree: block-causal parallel == cached chunk loop == a dense masked reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from diagvid.model.dit import WanDiT
from tests.conftest import tiny_inputs

K = 2  # latent frames per chunk


def dense_block_causal_mask(
    frames: int, s: int, k: int, window: int | None = None, sink: int = 0
) -> torch.Tensor:
    """Bool [L, L] mask, True = may attend, built frame by frame independently of the model's chunk loop."""
    frame_of = torch.arange(frames * s) // s
    q_chunk_end = (frame_of // k + 1) * k  # exclusive end frame of each query's chunk
    kf = frame_of[None, :]
    allowed = kf < q_chunk_end[:, None]
    if window is not None:
        recent = kf >= (q_chunk_end[:, None] - (window - sink))
        allowed &= recent | (kf < sink)
    return allowed


def forward_with_dense_mask(model: WanDiT, x, t, ctx, mask: torch.Tensor) -> torch.Tensor:
    """Run the model in full mode but with SDPA given a dense mask: the independent reference."""
    original = F.scaled_dot_product_attention
    calls = []

    def masked(q, k, v, attn_mask=None, **kw):
        if q.shape[-2] == k.shape[-2] == mask.shape[0]:  # self-attention over the whole clip
            calls.append(1)
            attn_mask = mask
        return original(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = masked
    try:
        return model(x, t, ctx, attention="full")
    finally:
        F.scaled_dot_product_attention = original
        assert calls, "the dense mask was never applied"


@torch.no_grad()
def test_full_attention_differs_from_causal(tiny_dit):
    x, t, ctx = tiny_inputs(tiny_dit)
    full = tiny_dit(x, t, ctx, attention="full")
    causal = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    # chunk 0 sees only itself in causal mode: a full pass over chunk 0 alone gives the same result
    alone = tiny_dit(x[:, :, :K], t[:, :K], ctx, attention="full")
    assert (causal[:, :, :K] - alone).abs().max() <= 1e-5 * alone.abs().max()
    assert (full[:, :, :K] - causal[:, :, :K]).abs().max() > 1e-2


@torch.no_grad()
def test_block_causal_equals_dense_masked_reference(tiny_dit):
    x, t, ctx = tiny_inputs(tiny_dit)
    s = 2 * 3  # tokens per frame for a 4x6 latent and a 2x2 patch
    ours = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    ref = forward_with_dense_mask(tiny_dit, x, t, ctx, dense_block_causal_mask(6, s, K))
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@torch.no_grad()
def test_cached_chunk_loop_equals_block_causal(tiny_dit):
    """Clean context: feeding each chunk through the cache reproduces the parallel block-causal pass."""
    assert_cached_loop_equals_block_causal(tiny_dit, *tiny_inputs(tiny_dit))


def assert_cached_loop_equals_block_causal(model, x, t, ctx) -> None:
    """The 6 latent frames of `x` fed chunk by chunk through a cache reproduce the parallel block-causal pass."""
    parallel = model(x, t, ctx, attention="causal", frames_per_chunk=K)
    cache = model.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=6)
    outs = [
        model(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=cache, start_frame=i) for i in range(0, 6, K)
    ]
    assert (torch.cat(outs, dim=2) - parallel).abs().max() <= 1e-5 * parallel.abs().max()


@torch.no_grad()
def test_chunk_is_unchanged_when_a_later_chunk_changes(tiny_dit):
    x, t, ctx = tiny_inputs(tiny_dit)
    y = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    x2 = x.clone()
    x2[:, :, 4:] += 1.0
    y2 = tiny_dit(x2, t, ctx, attention="causal", frames_per_chunk=K)
    assert torch.equal(y[:, :, :4], y2[:, :, :4])
    assert not torch.allclose(y[:, :, 4:], y2[:, :, 4:])


@torch.no_grad()
def test_overwrite_keeps_the_last_forward_of_a_chunk(tiny_dit):
    """Re-running a chunk overwrites its slots: what the next chunk sees is the last forward's K/V."""
    x, t, ctx = tiny_inputs(tiny_dit, frames=4)
    cache = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=4)
    noisy = torch.randn_like(x[:, :, :K])
    tiny_dit(noisy, t[:, :K] * 0 + 999, ctx, cache=cache, start_frame=0)  # first pass: overwritten below
    tiny_dit(x[:, :, :K], t[:, :K], ctx, cache=cache, start_frame=0)
    second = tiny_dit(x[:, :, K:], t[:, K:], ctx, cache=cache, start_frame=K)
    parallel = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    assert (second - parallel[:, :, K:]).abs().max() <= 1e-5 * parallel.abs().max()


@pytest.mark.parametrize(("window", "sink"), [(6, 2), (4, 0), (7, 1)])
@torch.no_grad()
def test_rolling_cache_equals_windowed_recompute(tiny_dit, window, sink):
    """After evictions, cached output == a block-causal pass over sink + window frames at the same positions."""
    frames = 12
    x, t, ctx = tiny_inputs(tiny_dit, frames=frames)
    cache = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=window, sink_frames=sink)
    outs = []
    for i in range(0, frames, K):
        outs.append(tiny_dit(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=cache, start_frame=i))
    cached = torch.cat(outs, dim=2)
    assert cache.num_frames == window and cache.evicted_frames == frames - window
    s = 6
    ref = forward_with_dense_mask(tiny_dit, x, t, ctx, dense_block_causal_mask(frames, s, K, window, sink))
    assert (cached - ref).abs().max() <= 1e-5 * ref.abs().max()
    parallel = tiny_dit(
        x, t, ctx, attention="causal", frames_per_chunk=K, window_frames=window, sink_frames=sink
    )
    assert (parallel - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and it really is windowed: the unwindowed pass differs on the late chunks
    unwindowed = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    assert (unwindowed[:, :, -K:] - ref[:, :, -K:]).abs().max() > 1e-3


@torch.no_grad()
def test_cache_rope_mode_matches_absolute_before_eviction_and_stays_bounded(tiny_dit):
    frames = 12
    x, t, ctx = tiny_inputs(tiny_dit, frames=frames)
    absolute = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=6, sink_frames=2)
    relative = tiny_dit.new_cache(
        batch_size=2, latent_hw=(4, 6), capacity_frames=6, sink_frames=2, rope="cache"
    )
    for i in range(0, frames, K):
        a = tiny_dit(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=absolute, start_frame=i)
        r = tiny_dit(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=relative, start_frame=i)
        if i + K <= 6:  # no eviction yet: identical positions
            assert torch.allclose(a, r, atol=1e-5)
        assert relative.chunk.rope_frame + K <= 6  # positions never leave the cache
    assert not torch.allclose(a, r, atol=1e-4)  # after eviction the sink is nearer in cache positions


def test_cache_relative_rope_rebases_keys_exactly(tiny_dit):
    """Re-rotated window keys after eviction equal keys rotated at their new slot positions from scratch."""
    from diagvid.model.cache import KVCache
    from diagvid.model.rope import apply_rope, grid_positions, rope_cos_sin

    s, dh = 6, tiny_dit.cfg.head_dim
    cache = KVCache(
        num_layers=1,
        batch_size=1,
        num_heads=2,
        head_dim=dh,
        tokens_per_frame=s,
        capacity_frames=4,
        sink_frames=1,
        rope="cache",
    )
    raw = torch.randn(1, 8 * s, 2, dh)  # un-rotated keys of 8 frames
    for start in range(0, 8, K):
        slots = cache.prepare(start, K)
        cos, sin = rope_cos_sin(grid_positions(K, 2, 3, slots.rope_frame), dh)
        k = apply_rope(raw[:, start * s : (start + K) * s], cos, sin)
        cache.write_and_read(0, k, k)
    held = cache.slot_frames  # absolute frames now in slots 0..3
    assert held == [0, 5, 6, 7]
    expect = torch.cat(
        [
            apply_rope(raw[:, f * s : (f + 1) * s], *rope_cos_sin(grid_positions(1, 2, 3, slot), dh))
            for slot, f in enumerate(held)
        ],
        dim=1,
    )
    assert torch.allclose(cache.k[0], expect, atol=1e-5)


def test_cache_rejects_out_of_order_chunks(tiny_dit):
    x, t, ctx = tiny_inputs(tiny_dit, frames=K)
    cache = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=6)
    with torch.no_grad():
        tiny_dit(x, t, ctx, cache=cache, start_frame=0)
        with pytest.raises(ValueError, match="append at frame 2"):
            tiny_dit(x, t, ctx, cache=cache, start_frame=4)


def test_gradients_flow_through_cached_chunk_only(tiny_dit):
    """Under autograd the current chunk keeps its graph and the cached prefix is a constant."""
    x, t, ctx = tiny_inputs(tiny_dit, frames=4)
    cache = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=4)
    x0 = x[:, :, :K].clone().requires_grad_(True)
    with torch.no_grad():
        tiny_dit(x0, t[:, :K], ctx, cache=cache, start_frame=0)
    x1 = x[:, :, K:].clone().requires_grad_(True)
    out = tiny_dit(x1, t[:, K:], ctx, cache=cache, start_frame=K)
    out.square().mean().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    assert x0.grad is None
    assert all(p.grad is not None for p in tiny_dit.blocks[0].self_attn.parameters())


def test_bad_inputs_raise(tiny_dit):
    x, t, ctx = tiny_inputs(tiny_dit)
    with pytest.raises(ValueError, match="frames_per_chunk=4 must be a positive divisor of 6"):
        tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=4)
    with pytest.raises(ValueError, match="attention='sparse'"):
        tiny_dit(x, t, ctx, attention="sparse")
    with pytest.raises(ValueError, match="patch_size"):
        tiny_dit(x[..., :3, :], t, ctx)
    with pytest.raises(ValueError, match="timesteps of shape"):
        tiny_dit(x, t[:, :2], ctx)


@torch.no_grad()
def test_static_shape_cache_matches_the_dynamic_one_with_fixed_shapes(tiny_dit, monkeypatch):
    """Reading the whole buffer with a mask (graph-capturable) gives the same stream as growing slices."""
    frames = 10
    x, t, ctx = tiny_inputs(tiny_dit, frames=frames)
    dynamic = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=6, sink_frames=2)
    static = tiny_dit.new_cache(
        batch_size=2, latent_hw=(4, 6), capacity_frames=6, sink_frames=2, static_shapes=True
    )
    key_lengths = set()
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            key_lengths.add(k.shape[-2])
        return original(q, k, v, attn_mask=attn_mask, **kw)

    for i in range(0, frames, K):
        a = tiny_dit(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=dynamic, start_frame=i)
        tiny_dit(torch.randn_like(x[:, :, i : i + K]), t[:, i : i + K], ctx, cache=static, start_frame=i)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        b = tiny_dit(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=static, start_frame=i)  # overwrite
        monkeypatch.setattr(F, "scaled_dot_product_attention", original)
        assert torch.allclose(a, b, atol=1e-5), f"chunk at frame {i} differs"
    assert key_lengths == {6 * 6}  # always the whole buffer: 6 frames x 6 tokens


@torch.no_grad()
def test_bf16_weights_run_every_attention_mode_close_to_fp32(tiny_dit):
    # what the GPU benchmark does (`WanDiT(cfg).to(torch.bfloat16)`, bf16 inputs): every mode must run, give
    # bf16 out and stay within bf16's rounding of the fp32 model
    x, t, ctx = tiny_inputs(tiny_dit)
    half = copy.deepcopy(tiny_dit).to(torch.bfloat16)
    xb, cb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
    cache = half.new_cache(batch_size=x.shape[0], latent_hw=tuple(x.shape[-2:]), capacity_frames=6)
    chunks = [
        half(xb[:, :, a : a + K], t[:, a : a + K], cb, cache=cache, start_frame=a) for a in range(0, 6, K)
    ]
    causal = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    for mode, got, want in [
        ("full", half(xb, t, cb, attention="full"), tiny_dit(x, t, ctx, attention="full")),
        ("causal", half(xb, t, cb, attention="causal", frames_per_chunk=K), causal),
        ("cached", torch.cat(chunks, dim=2), causal),
    ]:
        assert got.dtype == torch.bfloat16, mode
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < 0.03, (mode, err.item())


@torch.no_grad()
def test_first_frame_embedding_marks_absolute_frame_zero_in_every_mode(tiny_dit):
    """The anchor lands on latent frame 0 of the clip: a zero one is the model without it, bit for bit; a
    learned one is added to frame 0's patch embeddings only, and the cached chunk loop (frame 0 in the first
    chunk only) still equals the parallel block-causal pass."""
    from dataclasses import replace

    from tests.conftest import randomize

    x, t, ctx = tiny_inputs(tiny_dit)
    anchored = WanDiT(replace(tiny_dit.cfg, first_frame_embedding=True)).eval()
    state = {**tiny_dit.state_dict(), "first_frame": torch.zeros(tiny_dit.cfg.dim)}
    anchored.load_state_dict(state)
    assert torch.equal(anchored(x, t, ctx), tiny_dit(x, t, ctx))

    anchored.first_frame.copy_(randomize(torch.nn.Linear(tiny_dit.cfg.dim, 1), seed=5).weight[0])
    full = anchored(x, t, ctx)
    assert not torch.allclose(full, tiny_dit(x, t, ctx))
    # the same vector added by hand to frame 0's patch embeddings [B, D, F, H, W] is what the model computes
    by_hand = copy.deepcopy(tiny_dit)
    bias = anchored.first_frame.view(1, -1, 1, 1)
    by_hand.patch_embedding.register_forward_hook(
        lambda module, args, out: torch.cat([out[:, :, :1] + bias[:, :, None], out[:, :, 1:]], dim=2)
    )
    assert torch.allclose(by_hand(x, t, ctx), full, atol=1e-6)

    assert_cached_loop_equals_block_causal(anchored, x, t, ctx)


@torch.no_grad()
def test_position_grid_adds_one_vector_per_place_in_every_frame(tiny_dit):
    """A zero position table is the model without it, bit for bit; a learned one is added to the patch
    embeddings of every frame at its place; the cached chunk loop still equals block-causal; a clip of
    another token grid is refused by name."""
    from dataclasses import replace

    x, t, ctx = tiny_inputs(tiny_dit)  # latent 4 x 6: a token grid of 2 x 3
    placed = WanDiT(replace(tiny_dit.cfg, position_grid=(2, 3))).eval()
    placed.load_state_dict({**tiny_dit.state_dict(), "position": torch.zeros(6, tiny_dit.cfg.dim)})
    assert torch.equal(placed(x, t, ctx), tiny_dit(x, t, ctx))

    placed.position.copy_(torch.randn(6, tiny_dit.cfg.dim, generator=torch.Generator().manual_seed(3)))
    full = placed(x, t, ctx)
    assert not torch.allclose(full, tiny_dit(x, t, ctx))
    by_hand = copy.deepcopy(tiny_dit)
    table = placed.position.T.reshape(1, -1, 1, 2, 3)  # [1, D, 1, H, W], row-major like the tokens
    by_hand.patch_embedding.register_forward_hook(lambda module, args, out: out + table)
    assert torch.allclose(by_hand(x, t, ctx), full, atol=1e-6)

    assert_cached_loop_equals_block_causal(placed, x, t, ctx)

    with pytest.raises(
        ValueError, match=r"token grid \(height=2, width=2\) differs from position_grid=\(2, 3\)"
    ):
        placed(x[..., :4], t, ctx)
    with pytest.raises(ValueError, match=r"position_grid=\(2, 0\) must be two positive ints"):
        replace(tiny_dit.cfg, position_grid=(2, 0))


def motion_stem_by_hand(x: torch.Tensor, weight: torch.Tensor, back: int, margin: int) -> torch.Tensor:
    """The motion stem's tokens [B, D, F, H, W] summed tap by tap: token (f, i, j) of a (1, 2, 2) patch reads
    latent frames f - back .. f and pixels 2i - margin .. 2i + 1 + margin, zero outside the clip."""
    b, _, frames, hl, wl = x.shape
    d, _, kt, kh, kw = weight.shape
    out = torch.zeros(b, d, frames, hl // 2, wl // 2)
    for f in range(frames):
        for i in range(hl // 2):
            for j in range(wl // 2):
                for a in range(kt):
                    for p in range(kh):
                        for q in range(kw):
                            ff, yy, xx = f - back + a, 2 * i - margin + p, 2 * j - margin + q
                            if 0 <= ff < frames and 0 <= yy < hl and 0 <= xx < wl:
                                out[:, :, f, i, j] += x[:, :, ff, yy, xx] @ weight[:, :, a, p, q].T
    return out


@torch.no_grad()
def test_motion_stem_reads_the_frames_before_each_patch_and_keeps_block_causal_causal(tiny_dit):
    """A zero stem is the model without it, bit for bit; a learned one adds to each token what its kernel
    reads of the earlier frames and the pixels around the patch (a tap-by-tap sum written here); it looks
    back only, so the block-causal pass stays causal; a KV cache and a bad config are refused by name."""
    from dataclasses import replace

    x, t, ctx = tiny_inputs(tiny_dit)
    stemmed = WanDiT(replace(tiny_dit.cfg, motion_stem=(2, 1))).eval()
    assert stemmed.motion_stem.weight.shape[2:] == (3, 4, 4)
    stemmed.load_state_dict({**tiny_dit.state_dict(), "motion_stem.weight": stemmed.motion_stem.weight})
    assert not stemmed.motion_stem.weight.any()  # zero at initialisation
    assert torch.equal(stemmed(x, t, ctx), tiny_dit(x, t, ctx))

    gen = torch.Generator().manual_seed(7)
    stemmed.motion_stem.weight.copy_(torch.randn(stemmed.motion_stem.weight.shape, generator=gen) * 0.1)
    full = stemmed(x, t, ctx)
    assert not torch.allclose(full, tiny_dit(x, t, ctx))
    by_hand = copy.deepcopy(tiny_dit)
    extra = motion_stem_by_hand(x, stemmed.motion_stem.weight, back=2, margin=1)
    by_hand.patch_embedding.register_forward_hook(lambda module, args, out: out + extra)
    assert torch.allclose(by_hand(x, t, ctx), full, atol=1e-5)

    # editing the last chunk's frames leaves the earlier chunks' block-causal output alone
    causal = stemmed(x, t, ctx, attention="causal", frames_per_chunk=K)
    edited = x.clone()
    edited[:, :, -K:] += 1.0
    again = stemmed(edited, t, ctx, attention="causal", frames_per_chunk=K)
    assert torch.equal(again[:, :, :-K], causal[:, :, :-K])
    assert not torch.allclose(again[:, :, -K:], causal[:, :, -K:])

    cache = stemmed.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=6)
    with pytest.raises(ValueError, match=r"motion_stem=\(2, 1\) reads the latent frames before each chunk"):
        stemmed(x[:, :, :K], t[:, :K], ctx, cache=cache)
    for bad in ((0, 0), (2, -1), (1,), (1.5, 1)):
        with pytest.raises(ValueError, match=r"motion_stem=.* must be \(frames, margin\)"):
            replace(tiny_dit.cfg, motion_stem=bad)
