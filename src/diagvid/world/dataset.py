"""Deterministic toy-world data: seeded clip specs, an endless dataset, and held-out evaluation sets.

Training seeds are the integers in [0, TRAIN_SEED_LIMIT); evaluation clips use seeds from
EVAL_SEED_BASE upwards, so no evaluation clip can ever be a training clip.
"""

from collections.abc import Iterator, Sequence
from itertools import count

import numpy as np
import torch

from diagvid.model.vae import frames_to_tensor, tensor_to_frames  # noqa: F401  (re-exported by diagvid.world)
from diagvid.world.captions import PromptObject, caption, parse_caption
from diagvid.world.render import (
    COLOURS,
    DEFAULT_SIZE,
    DIRECTIONS,
    RADIUS_RANGE,
    SHAPES,
    SPEEDS,
    ClipSpec,
    ObjectSpec,
    position_bounds,
    render,
    scale,
    speed_px,
)

TRAIN_SEED_LIMIT = 2**31
EVAL_SEED_BASE = 2**31
DEFAULT_NUM_FRAMES = 17
# the first bounce comes no earlier than this, so the opening frames show the captioned direction
MIN_FRAMES_BEFORE_BOUNCE = 3

# each held-out set owns a seed range starting at EVAL_SEED_BASE + its offset
_EVAL_SEED_OFFSETS: dict[str, int] = {"heldout-48": 0, "heldout-8": 1_000_000}
# draw k of a set starts k * _DRAW_STRIDE seeds further on, far below the next set's offset
_DRAW_STRIDE = 10_000
EVAL_DRAWS = 100
"""Independent draws of each held-out set (draw 0 is the reference, draw 1 the real-vs-real floor)."""
EVAL_SETS: tuple[str, ...] = tuple(_EVAL_SEED_OFFSETS)

COLOURS_LIST: tuple[str, ...] = tuple(COLOURS)
DIRECTIONS_LIST: tuple[str, ...] = tuple(DIRECTIONS)
SPEEDS_LIST: tuple[str, ...] = tuple(SPEEDS)


def _start(rng: np.random.Generator, lo: float, hi: float, velocity: float) -> float:
    # keep MIN_FRAMES_BEFORE_BOUNCE frames of free travel ahead of the object along this axis
    room = MIN_FRAMES_BEFORE_BOUNCE * abs(velocity)
    if velocity > 0:
        hi -= room
    elif velocity < 0:
        lo += room
    return float(rng.uniform(lo, hi))


def sample_object(
    rng: np.random.Generator,
    size: int = DEFAULT_SIZE,
    *,
    colour: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
    speed: str | None = None,
) -> ObjectSpec:
    """One object with the given attributes; the others, the radius and the start are drawn from rng."""
    # draw every random number even when an attribute is given, so the rest does not depend on it
    draws = (
        COLOURS_LIST[rng.integers(len(COLOURS_LIST))],
        SHAPES[rng.integers(len(SHAPES))],
        DIRECTIONS_LIST[rng.integers(len(DIRECTIONS_LIST))],
        SPEEDS_LIST[rng.integers(len(SPEEDS_LIST))],
    )
    colour = colour or draws[0]
    shape = shape or draws[1]
    direction = direction or draws[2]
    speed = speed or draws[3]
    radius = float(rng.uniform(*RADIUS_RANGE)) * scale(size)
    (x_lo, x_hi), (y_lo, y_hi) = position_bounds(shape, radius, size)
    step = speed_px(speed, size)
    vx, vy = (c * step for c in DIRECTIONS[direction])
    start = (_start(rng, x_lo, x_hi, vx), _start(rng, y_lo, y_hi, vy))
    return ObjectSpec(shape, colour, direction, speed, start, radius)


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed={seed} must be non-negative; training uses 0 <= seed < {TRAIN_SEED_LIMIT}")


def sample_spec(
    seed: int, num_frames: int = DEFAULT_NUM_FRAMES, size: int = DEFAULT_SIZE, p_two: float = 0.25
) -> ClipSpec:
    """The clip spec of a seed: one object, or two of different colours with probability p_two."""
    _check_seed(seed)
    if not 0.0 <= p_two <= 1.0:
        raise ValueError(f"p_two={p_two} must be a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    n = 2 if rng.random() < p_two else 1
    objects = [sample_object(rng, size)]
    if n == 2:
        # a second colour keeps the caption and the read-back unambiguous
        others = [c for c in COLOURS_LIST if c != objects[0].colour]
        objects.append(sample_object(rng, size, colour=others[rng.integers(len(others))]))
    return ClipSpec(objects, int(rng.integers(2**31)), num_frames, size)


def spec_from_prompt(
    prompt: str | Sequence[PromptObject],
    seed: int,
    num_frames: int = DEFAULT_NUM_FRAMES,
    size: int = DEFAULT_SIZE,
) -> ClipSpec:
    """A clip that does what the prompt asks; whatever it leaves open is drawn from the seed."""
    _check_seed(seed)
    asked = parse_caption(prompt) if isinstance(prompt, str) else list(prompt)
    rng = np.random.default_rng(seed)
    objects = [
        sample_object(rng, size, colour=a.colour, shape=a.shape, direction=a.direction, speed=a.speed)
        for a in asked
    ]
    return ClipSpec(objects, int(rng.integers(2**31)), num_frames, size)


def _eval_attributes(name: str) -> list[PromptObject]:
    nc, nd, ns, nv = len(COLOURS_LIST), len(DIRECTIONS_LIST), len(SHAPES), len(SPEEDS_LIST)
    if name == "heldout-48":
        # every colour x direction once; shape and speed are offset by the colour so that every colour
        # and every direction also sees every shape and both speeds
        table = [(c, d, (d + 2 * c) % ns, (d + c) % nv) for c in range(nc) for d in range(nd)]
    else:
        table = [(i % nc, i, i % ns, (i // 2) % nv) for i in range(nd)]
    return [
        PromptObject(COLOURS_LIST[c], SHAPES[s], DIRECTIONS_LIST[d], SPEEDS_LIST[v]) for c, d, s, v in table
    ]


def _check_eval_name(name: str) -> None:
    if name not in _EVAL_SEED_OFFSETS:
        raise ValueError(f"unknown evaluation set {name!r}; use one of {', '.join(_EVAL_SEED_OFFSETS)}")


def eval_specs(
    name: str, num_frames: int = DEFAULT_NUM_FRAMES, size: int = DEFAULT_SIZE, draw: int = 0
) -> list[ClipSpec]:
    """Reference clips of a held-out set, one per prompt, from seeds no training clip uses.

    `draw` k > 0 gives another clip for each prompt (its own start, radius and background): an independent
    sample of real clips, e.g. the floor of a distribution distance.
    """
    _check_eval_name(name)
    if not 0 <= draw < EVAL_DRAWS:
        raise ValueError(f"draw={draw} must be in [0, {EVAL_DRAWS})")
    offset = _EVAL_SEED_OFFSETS[name] + draw * _DRAW_STRIDE
    return [
        spec_from_prompt([a], EVAL_SEED_BASE + offset + i, num_frames, size)
        for i, a in enumerate(_eval_attributes(name))
    ]


def eval_prompts(name: str) -> list[str]:
    """The prompts of a held-out set ("heldout-48": every colour x direction; "heldout-8": quick)."""
    _check_eval_name(name)
    return [caption(spec) for spec in eval_specs(name, num_frames=1)]


class WorldDataset(torch.utils.data.Dataset):
    """Endless training clips: item i is the clip of seed seed_offset + i and its caption."""

    def __init__(
        self,
        num_frames: int = DEFAULT_NUM_FRAMES,
        size: int = DEFAULT_SIZE,
        p_two: float = 0.25,
        seed_offset: int = 0,
        as_uint8: bool = False,
    ) -> None:
        if not 0 <= seed_offset < TRAIN_SEED_LIMIT:
            raise ValueError(f"seed_offset={seed_offset} must be in [0, {TRAIN_SEED_LIMIT})")
        self.num_frames, self.size, self.p_two = num_frames, size, p_two
        self.seed_offset, self.as_uint8 = seed_offset, as_uint8

    def __len__(self) -> int:
        return TRAIN_SEED_LIMIT - self.seed_offset

    def __getitem__(self, index: int) -> tuple[torch.Tensor | np.ndarray, str]:
        """(video, caption): float [3, T, H, W] in [-1, 1], or uint8 [T, H, W, 3] with as_uint8."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside [0, {len(self)}): larger seeds are evaluation seeds")
        spec = sample_spec(self.seed_offset + index, self.num_frames, self.size, self.p_two)
        frames = render(spec).frames
        return (frames if self.as_uint8 else frames_to_tensor(frames)), caption(spec)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | np.ndarray, str]]:
        for i in count():
            yield self[i]
