"""KV cache for chunk-by-chunk causal inference: preallocated buffers, overwrite, window + sink eviction.

Shapes: Y layers, B batch, C capacity in tokens, N heads, Dh head dim, S tokens per latent frame.

Conventions
- Keys are stored AFTER RoPE (as CausVid and Self-Forcing do), so a cached key never needs rotating again
  in the common case.
- `rope="absolute"` (default, reference-compatible): a chunk is rotated at its absolute frame index; evicted
  frames leave the retained keys at their original positions, exactly what the published code computes.
- `rope="cache"`: a chunk is rotated at the frame index of the cache slot it is written to; on eviction the
  retained window keys are rotated back by the number of evicted frames (rotations compose), so positions
  stay inside [0, capacity) forever. This is what endless streaming needs: relative distances never exceed
  what the model saw in training.
- A forward at the same start frame as the previous one overwrites that chunk's slots (multi-step
  denoising, clean-context pass); a forward at the next frame appends, evicting the oldest non-sink frames
  when the buffer is full.
- Buffers are allocated once with fixed shapes, so a GPU path can compile and graph-capture around them.
- Under autograd, attention reads `cat(prefix.detach(), current)` instead of a view of the buffer, so later
  in-place writes can never corrupt tensors saved for backward (the hazard noted in the reference spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diagvid.model.rope import apply_rope, frame_shift_cos_sin


@dataclass(frozen=True)
class ChunkSlots:
    """Where the current chunk lives in the buffer and which frame index its RoPE uses."""

    start_slot: int  # first frame slot written by this chunk
    num_frames: int  # frames in this chunk
    rope_frame: int  # frame position used to rotate this chunk's queries and keys

    @property
    def end_slot(self) -> int:
        return self.start_slot + self.num_frames


class KVCache:
    """Self-attention K/V of earlier chunks, per layer, plus the cross-attention K/V of the current prompt."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        capacity_frames: int,
        sink_frames: int = 0,
        rope: str = "absolute",
        rope_theta: float = 10000.0,
        static_shapes: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity_frames < 1:
            raise ValueError(f"capacity_frames={capacity_frames} must be >= 1")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_frames={sink_frames} must be in [0, capacity_frames={capacity_frames})")
        if rope not in ("absolute", "cache"):
            raise ValueError(f"rope={rope!r}; allowed: 'absolute', 'cache'")
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        self.rope = rope
        self.rope_theta = rope_theta
        self.head_dim = head_dim
        shape = (num_layers, batch_size, capacity_frames * tokens_per_frame, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [Y, B, C, N, Dh]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.text_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        # static_shapes: attention reads the whole buffer with a mask of valid slots instead of a growing
        # slice, so every forward has the same shapes (what torch.compile / CUDA-graph capture need)
        self.static_shapes = static_shapes
        self.valid = torch.zeros(1, 1, 1, shape[2], dtype=torch.bool, device=device)  # SDPA mask, [1,1,1,C]
        self.reset()

    # ----- bookkeeping -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every cached frame and the prompt (buffers are kept, not reallocated)."""
        self.slot_frames: list[int] = []  # absolute frame index held by each used slot, in slot order
        self.chunk: ChunkSlots | None = None  # the chunk written last
        self.chunk_start_frame = -1  # absolute start frame of that chunk
        self._next_frame = 0  # absolute frame an appended chunk must start at
        self.evicted_frames = 0
        self.valid.zero_()
        self.reset_text()

    def reset_text(self) -> None:
        """Drop the cross-attention K/V so that the next forward encodes a new prompt (prompt switch)."""
        self.text_kv = [None] * self.num_layers

    @property
    def num_frames(self) -> int:
        """Frames currently held."""
        return len(self.slot_frames)

    @property
    def next_frame(self) -> int:
        """Absolute index of the frame an appended chunk must start at."""
        return self._next_frame

    def prepare(self, start_frame: int, num_frames: int) -> ChunkSlots:
        """Decide the slots for a chunk at absolute `start_frame` (overwrite, append or evict-then-append).

        Called once per forward, before any layer runs; every layer then writes the same slots.
        """
        if num_frames > self.capacity_frames - self.sink_frames:
            raise ValueError(
                f"a chunk of {num_frames} frames does not fit a cache of {self.capacity_frames} frames "
                f"with {self.sink_frames} sink frames"
            )
        if self.chunk is not None and start_frame == self.chunk_start_frame:
            if num_frames != self.chunk.num_frames:
                raise ValueError(
                    f"re-running the chunk at frame {start_frame} with {num_frames} frames; "
                    f"it was written with {self.chunk.num_frames}"
                )
            return self.chunk  # overwrite the same slots
        if start_frame != self.next_frame:
            raise ValueError(
                f"chunk starts at frame {start_frame}; the cache can only overwrite the last chunk "
                f"(frame {self.chunk_start_frame}) or append at frame {self.next_frame}"
            )
        overflow = self.num_frames + num_frames - self.capacity_frames
        if overflow > 0:
            self._evict(overflow)
        start_slot = self.num_frames
        self.slot_frames.extend(range(start_frame, start_frame + num_frames))
        self._next_frame = start_frame + num_frames
        rope_frame = start_frame if self.rope == "absolute" else start_slot
        self.chunk = ChunkSlots(start_slot, num_frames, rope_frame)
        self.chunk_start_frame = start_frame
        self.valid.zero_()
        self.valid[..., : self.chunk.end_slot * self.tokens_per_frame] = True  # in place: fixed address
        return self.chunk

    def skip_to(self, start_frame: int) -> None:
        """Drop every non-sink frame and go on at absolute `start_frame` (>= `next_frame`), as if the frames
        in between had been written and evicted.

        The prompt re-cache of `diagvid.stream` uses it to replay only the chunks a rolling window still
        holds: the sink's chunk, then the window's chunks at their own start frames.
        """
        if start_frame < self.next_frame:
            raise ValueError(f"skip_to({start_frame}) goes back; the next frame is {self.next_frame}")
        kept = min(self.sink_frames, self.num_frames)
        self.evicted_frames += self.num_frames - kept + start_frame - self.next_frame
        del self.slot_frames[kept:]
        self._next_frame = start_frame
        self.chunk = None  # the last chunk's slots are gone: nothing to overwrite
        self.chunk_start_frame = -1
        self.valid.zero_()
        self.valid[..., : kept * self.tokens_per_frame] = True

    def _evict(self, frames: int) -> None:
        """Drop the `frames` oldest non-sink frames and slide the window left, in every layer at once."""
        s, tpf = self.sink_frames, self.tokens_per_frame
        keep = self.num_frames - s - frames  # window frames that stay
        src = slice((s + frames) * tpf, (s + frames + keep) * tpf)
        dst = slice(s * tpf, (s + keep) * tpf)
        # clone: source and destination overlap
        k_kept = self.k[:, :, src].clone()
        if self.rope == "cache":
            # keys move `frames` slots to the left, so their frame rotation moves back by the same amount
            cos, sin = frame_shift_cos_sin(-frames, self.head_dim, self.rope_theta)
            cos, sin = cos.to(k_kept.device), sin.to(k_kept.device)
            y, b, length, n, dh = k_kept.shape
            k_kept = apply_rope(k_kept.reshape(y * b, length, n, dh), cos, sin).reshape(k_kept.shape)
        self.k[:, :, dst] = k_kept
        self.v[:, :, dst] = self.v[:, :, src].clone()
        del self.slot_frames[s : s + frames]
        self.evicted_frames += frames

    # ----- per-layer access --------------------------------------------------------------------------------

    def write_and_read(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the current chunk's rotated k and v [B, K*S, N, Dh]; return the K/V to attend [B, M, N, Dh]
        and an SDPA mask (None unless `static_shapes`, where M is the whole buffer)."""
        assert self.chunk is not None, "prepare() must run before write_and_read()"
        tpf = self.tokens_per_frame
        a, b = self.chunk.start_slot * tpf, self.chunk.end_slot * tpf
        assert k.shape[1] == b - a, f"chunk has {k.shape[1]} tokens, slots hold {b - a}"
        self.k[layer, :, a:b] = k.detach()
        self.v[layer, :, a:b] = v.detach()
        if k.requires_grad or v.requires_grad:
            # functional read: earlier chunks are constants, the current chunk keeps its graph
            k_all = torch.cat([self.k[layer, :, :a], k], dim=1)
            v_all = torch.cat([self.v[layer, :, :a], v], dim=1)
            return k_all, v_all, None
        if self.static_shapes:
            return self.k[layer], self.v[layer], self.valid
        return self.k[layer, :, :b], self.v[layer, :, :b], None

    def memory_bytes(self) -> int:
        """Bytes held by the self-attention buffers."""
        return 2 * self.k.numel() * self.k.element_size()
