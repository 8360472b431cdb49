"""Procedural renderer: coloured shapes bouncing on a smooth textured background, with ground truth.

Coordinates are in pixels with the origin at the top-left corner of the frame, x to the right and y
down; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5). Frames are uint8 [T, H, W, 3].
"""

from dataclasses import dataclass, field

import numpy as np

FPS = 16
DEFAULT_SIZE = 64
# speeds and radii are defined for 64 px frames and scale with the frame size
REFERENCE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Six hues about 60 degrees apart, each with one channel near 40 and one above 200, so every colour is
# far from the grey background in some channel and keeps its hue through chroma subsampling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (240, 220, 40),
    "green": (40, 200, 60),
    "cyan": (40, 215, 225),
    "blue": (40, 90, 235),
    "magenta": (220, 50, 220),
}

_DIAG = float(np.sqrt(0.5))
# unit vectors in image coordinates (y grows downwards), so "up" is negative y
DIRECTIONS: dict[str, tuple[float, float]] = {
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up-left": (-_DIAG, -_DIAG),
    "up-right": (_DIAG, -_DIAG),
    "down-left": (-_DIAG, _DIAG),
    "down-right": (_DIAG, _DIAG),
}

# px/frame at 64 px; the ratio 2.5 keeps the two classes apart even when a generator is sluggish
SPEEDS: dict[str, float] = {"slow": 1.0, "fast": 2.5}

RADIUS_RANGE: tuple[float, float] = (7.0, 10.0)
# a triangle inscribed in a circle covers only 41 % of it; drawing it in a larger circle keeps it about as
# visible as the other shapes after the VAE's downsampling
TRIANGLE_SCALE = 1.25


def scale(size: int) -> float:
    """Factor that converts 64-px lengths and speeds to a frame of `size` pixels."""
    return size / REFERENCE_SIZE


def speed_px(speed: str, size: int) -> float:
    """Pixels per frame for a speed class in a frame of `size` pixels."""
    return SPEEDS[speed] * scale(size)


def shape_extent(shape: str, radius: float) -> tuple[float, float, float, float]:
    """Distances (left, right, up, down) from an object's centre to the edges of its shape."""
    if shape == "triangle":
        # equilateral, pointing up, inscribed in a circle of TRIANGLE_SCALE * radius around its centroid
        r = TRIANGLE_SCALE * radius
        half_width = r * np.sqrt(3.0) / 2.0
        return half_width, half_width, r, r / 2.0
    return radius, radius, radius, radius


def position_bounds(shape: str, radius: float, size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Range ((x_lo, x_hi), (y_lo, y_hi)) of centre positions that keep the shape inside the frame."""
    left, right, up, down = shape_extent(shape, radius)
    return (left, size - right), (up, size - down)


def _check(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ObjectSpec:
    """One moving object: its look, its motion class, where it starts and its radius in pixels."""

    shape: str
    colour: str
    direction: str
    speed: str
    start_xy: tuple[float, float]
    size: float

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, tuple(COLOURS))
        _check("direction", self.direction, tuple(DIRECTIONS))
        _check("speed", self.speed, tuple(SPEEDS))
        if not self.size > 0:
            raise ValueError(f"size={self.size} must be a positive radius in pixels")


@dataclass
class ClipSpec:
    """Everything needed to render a clip: objects, background texture seed, length and frame size."""

    objects: list[ObjectSpec]
    background_seed: int
    num_frames: int
    size: int = DEFAULT_SIZE

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a clip needs at least one object")
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} must be at least 1")
        for obj in self.objects:
            (x_lo, x_hi), (y_lo, y_hi) = position_bounds(obj.shape, obj.size, self.size)
            x, y = obj.start_xy
            if not (x_lo <= x <= x_hi and y_lo <= y <= y_hi):
                raise ValueError(
                    f"start_xy={obj.start_xy} puts the {obj.shape} of radius {obj.size} outside a "
                    f"{self.size} px frame; x must be in [{x_lo:.2f}, {x_hi:.2f}], y in [{y_lo:.2f}, {y_hi:.2f}]"
                )


@dataclass
class ObjectTruth:
    """Ground truth of one object over a clip."""

    shape: str
    colour: str
    direction: str
    speed: str
    size: float
    positions: np.ndarray
    """[T, 2] centre (x, y) in pixels at each frame."""
    velocities: np.ndarray
    """[T, 2] velocity (px/frame) that carries the object from frame t towards frame t + 1."""
    bounces: list[tuple[int, str]] = field(default_factory=list)
    """(frame, axis) for each wall hit: the first frame whose velocity has that component reflected."""


@dataclass
class Clip:
    """A rendered clip: uint8 frames [T, H, W, 3], the per-object ground truth and the spec."""

    frames: np.ndarray
    truth: list[ObjectTruth]
    spec: ClipSpec


def simulate(obj: ObjectSpec, num_frames: int, size: int) -> ObjectTruth:
    """Move one object frame by frame, reflecting the velocity component that crosses a wall."""
    bounds = position_bounds(obj.shape, obj.size, size)
    step = speed_px(obj.speed, size)
    unit = DIRECTIONS[obj.direction]
    pos = [float(obj.start_xy[0]), float(obj.start_xy[1])]
    vel = [unit[0] * step, unit[1] * step]
    positions = np.empty((num_frames, 2))
    velocities = np.empty((num_frames, 2))
    bounces: list[tuple[int, str]] = []
    # plain floats: a Python loop over scalars is faster than numpy for two numbers per frame
    for t in range(num_frames):
        positions[t] = pos
        velocities[t] = vel
        for axis in (0, 1):
            lo, hi = bounds[axis]
            p = pos[axis] + vel[axis]
            # exact elastic reflection of the part of the step that went past the wall; a loop because
            # a step longer than the free range would hit both walls
            while p < lo or p > hi:
                p = 2 * lo - p if p < lo else 2 * hi - p
                vel[axis] = -vel[axis]
                if not bounces or bounces[-1] != (t + 1, "xy"[axis]):
                    bounces.append((t + 1, "xy"[axis]))
            pos[axis] = p
    return ObjectTruth(
        obj.shape, obj.colour, obj.direction, obj.speed, obj.size, positions, velocities, bounces
    )


def background(seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Static, smooth, low-saturation mid-grey texture [H, W, 3] (float32, 0-255) for a seed."""
    rng = np.random.default_rng(seed)
    coord = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coord, coord, indexing="ij")
    # a few waves of 0.5-1.5 cycles per frame: visible texture, but nothing a 3x3 high-pass would see
    pattern = np.zeros((size, size))
    for _ in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(0.5, 1.5)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.cos(angle) * xx + np.sin(angle) * yy
        pattern += rng.uniform(5.0, 9.0) * np.sin(2 * np.pi * freq * wave + phase)
    grey = rng.uniform(110.0, 145.0)
    tint = rng.uniform(-7.0, 7.0, size=3)
    return (grey + tint + pattern[..., None]).astype(np.float32)


def background_frame(seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """The background exactly as rendered clips show it: uint8 [H, W, 3]."""
    return np.clip(np.rint(background(seed, size)), 0, 255).astype(np.uint8)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of pixels whose centres lie in the shape, given offsets from the object's centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    # intersection of three half-planes whose inward normals are 120 degrees apart; the inradius is half
    # the circumradius
    s = np.sqrt(3.0) / 2.0
    half = TRIANGLE_SCALE * radius / 2.0
    return (dy <= half) & (s * dx - 0.5 * dy <= half) & (-s * dx - 0.5 * dy <= half)


def render(spec: ClipSpec) -> Clip:
    """Render a clip and its ground truth; any length works because motion is simulated with bounces."""
    size, num_frames = spec.size, spec.num_frames
    frames = np.broadcast_to(background_frame(spec.background_seed, size), (num_frames, size, size, 3)).copy()
    centres = np.arange(size) + 0.5
    truth = []
    # later objects are drawn over earlier ones
    for obj in spec.objects:
        track = simulate(obj, num_frames, size)
        dx = centres[None, None, :] - track.positions[:, 0, None, None]  # [T, 1, W]
        dy = centres[None, :, None] - track.positions[:, 1, None, None]  # [T, H, 1]
        frames[shape_mask(obj.shape, dx, dy, obj.size)] = COLOURS[obj.colour]
        truth.append(track)
    return Clip(frames, truth, spec)
