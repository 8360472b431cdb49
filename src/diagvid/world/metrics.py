"""Read-back metrics: what a generated video shows, measured with the toy world's knowledge only.

Nothing here looks at a generator. A video is uint8 [T, H, W, 3]; the tracker finds the objects as the
pixels far from an estimated background, follows them, and reads colour, shape, direction and speed
back, so they can be compared with what the prompt asked for. Lengths and speeds are in pixels of the
video; thresholds are set for 64 px frames and scale with the frame size.
"""

import math
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise, permutations

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.stats import trim_mean

from diagvid.world.captions import PromptObject, parse_caption
from diagvid.world.render import COLOURS, DIRECTIONS, SPEEDS, scale

READER_VERSION = 2
"""Raised whenever a change moves what the read-back reports, so eval JSONs say which reader scored them.
1: shapes told apart by how much of its bounding box a blob fills (eval JSONs before 2026-12-02, which do
not record a version); 2: by how far its corners reach along the diagonals (see CORNERS_SQUARE_ABOVE)."""

CHUNK_FRAMES = 12
"""Frames per chunk for the per-chunk drift and consistency numbers."""

# Objects are saturated (every palette colour has a channel near 40 and one above 200) and the
# background is grey, so a pixel with little chroma can be background and an object pixel differs from
# the background by far more than FG_DISTANCE in some channel.
BG_CHROMA = 48.0
FG_DISTANCE = 50.0
# a blob whose mean colour has less chroma than this is no palette colour at all
MIN_OBJECT_CHROMA = 30.0
MIN_AREA = 12.0
"""Smallest blob (pixels at 64 px) that counts as an object; smaller ones are noise."""
# Shapes are read per frame from two numbers that survive the codec's softening (both thresholds are the
# per-frame error minimum over 96 training-seed clips, sharp and through the toy VAE; docs/status.md):
# - triangles point up, so their pixels' y has a skewness near -0.52 sharp (-0.26 median through the
#   codec, 95 % below -0.09) against |skew| < 0.04 sharp for circles and squares (5 % below -0.11 coded);
# - an axis-aligned square reaches sqrt(2) further along the diagonals than along the axes (1.28 sharp
#   after the opening below trims its corner pixels, 1.12 median coded), a disc equally far (0.99 sharp,
#   1.03 coded). How much of the bounding box a blob fills, the earlier reader, lost the coded squares'
#   rounded corners: a quarter of them read as circles.
SKEW_TRIANGLE_BELOW = -0.12
CORNERS_SQUARE_ABOVE = 1.075
STATIC_SPEED = 0.35
"""Median px/frame (at 64 px) below which an object counts as not moving."""
SPEED_SPLIT = math.sqrt(SPEEDS["slow"] * SPEEDS["fast"])
"""px/frame (at 64 px) between slow and fast: the geometric mean of the two speeds."""
# the background of a long video is estimated from at most this many frames
_BG_SAMPLE_FRAMES = 64

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)
# colours are compared by the direction of their chroma (RGB minus its grey level), which ignores both
# brightness drift and oversaturation and keeps only the hue
_PALETTE_CHROMA = _PALETTE - _PALETTE.mean(1, keepdims=True)
_PALETTE_CHROMA /= np.linalg.norm(_PALETTE_CHROMA, axis=1, keepdims=True)
# blobs in one frame are 8-connected; frames are never connected to each other
_CONNECT = np.zeros((3, 3, 3), dtype=bool)
_CONNECT[1] = True
_OPEN = np.zeros((1, 3, 3), dtype=bool)
_OPEN[0, 1, :] = _OPEN[0, :, 1] = True


def _check_video(video: np.ndarray) -> None:
    ok = isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4
    if not ok or video.shape[-1] != 3:
        shape = getattr(video, "shape", None)
        dtype = getattr(video, "dtype", type(video).__name__)
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {dtype} of shape {shape}")


def _channel_max(x: np.ndarray) -> np.ndarray:
    # numpy reduces a last axis of length 3 one pixel at a time; two elementwise maxima are much faster
    return np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])


def _channel_min(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(x[..., 0], x[..., 1]), x[..., 2])


def _chunks(num_frames: int, chunk_frames: int) -> list[slice]:
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames} must be at least 1")
    return [slice(s, min(s + chunk_frames, num_frames)) for s in range(0, num_frames, chunk_frames)]


def _masked_median(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median over axis 0 of the entries where valid; NaN where there are none (faster than nanmedian)."""
    ordered = np.sort(np.where(valid, x, np.inf), axis=0)
    n = valid.sum(0)
    lo = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[None], 0)[0]
    hi = np.take_along_axis(ordered, np.maximum(n // 2, 0)[None], 0)[0]
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, (lo + hi) / 2, np.nan)


def estimate_background(video: np.ndarray, chunk_frames: int = CHUNK_FRAMES) -> np.ndarray:
    """Background [T, H, W, 3] float32: per chunk, each pixel's median over the frames where it is grey."""
    _check_video(video)
    x = video.astype(np.float32)
    # a plain temporal median would keep a slow object that covers a pixel for most of a chunk, and a
    # frozen video entirely; leaving out saturated pixels removes the objects whatever they do
    grey = np.broadcast_to(((_channel_max(x) - _channel_min(x)) < BG_CHROMA)[..., None], x.shape)
    out = np.empty_like(x)
    for sl in _chunks(len(x), chunk_frames):
        out[sl] = _masked_median(x[sl], grey[sl])
    missing = np.isnan(out)
    if missing.any():
        # pixels never grey within a chunk take their median over the whole video, and pixels never grey
        # at all the typical background level
        step = max(1, len(x) // _BG_SAMPLE_FRAMES)
        whole = _masked_median(x[::step], grey[::step])
        level = np.nanmedian(whole.reshape(-1, 3), axis=0) if not np.isnan(whole).all() else np.full(3, 128.0)
        whole = np.where(np.isnan(whole), level, whole)
        out = np.where(missing, whole[None], out)
    return out


def foreground(video: np.ndarray, chunk_frames: int = CHUNK_FRAMES) -> np.ndarray:
    """Object pixels [T, H, W] (bool): far from the estimated background in some channel."""
    bg = estimate_background(video, chunk_frames)
    far = _channel_max(np.abs(video.astype(np.float32) - bg)) > FG_DISTANCE
    # an opening drops isolated noise pixels, which would otherwise stretch an object's bounding box, and
    # filling holes puts back object pixels that noise pulled towards the background
    opened = ndimage.binary_opening(far, structure=_OPEN)
    # empty frames around the clip make the first and last frames interior, so their holes fill too
    padded = np.pad(opened, ((1, 1), (0, 0), (0, 0)))
    return ndimage.binary_fill_holes(padded, structure=_CONNECT)[1:-1]


@dataclass
class Blobs:
    """Connected object-like regions of every frame, as parallel arrays (one entry per blob)."""

    frame: np.ndarray
    area: np.ndarray
    xy: np.ndarray
    """[N, 2] centroid in pixels (pixel centres at +0.5)."""
    box: np.ndarray
    """[N, 4] bounding box x0, y0, x1, y1 (x1, y1 exclusive)."""
    rgb: np.ndarray
    """[N, 3] mean colour."""
    skew: np.ndarray
    """[N] skewness of the pixels' y: about -0.57 for the world's upward triangles, 0 for symmetric shapes."""
    corners: np.ndarray
    """[N] extent along the diagonals over extent along the axes: 1 for a disc, up to sqrt(2) for a square."""


def _extent(lab: np.ndarray, coord: np.ndarray, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-blob [start, stop) along one axis, over the rows (or columns) holding at least 2 of its pixels."""
    # a lone pixel that noise glued to an object's edge would otherwise stretch its bounding box
    counts = np.bincount(lab * size + coord, minlength=(n + 1) * size).reshape(n + 1, size)[1:]
    full = counts > 0
    solid = counts >= 2
    # blobs one pixel thick have no solid row; they keep their full extent
    use = np.where(solid.any(1, keepdims=True), solid, full)
    start = use.argmax(1)
    stop = size - use[:, ::-1].argmax(1)
    return start.astype(np.float64), stop.astype(np.float64)


def hue_class(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour by hue for colours [..., 3]; len(COLOURS) for greys."""
    rgb = np.asarray(rgb, dtype=np.float64)
    chroma = rgb - rgb.mean(-1, keepdims=True)
    nearest = np.argmax(chroma @ _PALETTE_CHROMA.T, axis=-1)
    grey = _channel_max(rgb) - _channel_min(rgb) < MIN_OBJECT_CHROMA
    return np.where(grey, len(_PALETTE_NAMES), nearest)


def classify_colour(rgb: np.ndarray) -> str | None:
    """Nearest palette colour by hue of a mean colour [3]; None for a grey blob."""
    k = int(hue_class(rgb))
    return _PALETTE_NAMES[k] if k < len(_PALETTE_NAMES) else None


def find_blobs(video: np.ndarray, mask: np.ndarray) -> Blobs:
    """Blobs of at least MIN_AREA (scaled) pixels in a foreground mask [T, H, W], one hue per blob."""
    # Splitting the mask by hue before labelling keeps two touching objects of different colours apart
    # (a two-object clip always has two colours); the object's own pixels share one hue.
    hue = np.full(mask.shape, -1, dtype=np.int64)
    hue[mask] = hue_class(video[mask])
    labels = np.zeros(mask.shape, dtype=np.int64)
    n = 0
    for k in np.unique(hue[mask]):
        part, count = ndimage.label(hue == k, structure=_CONNECT)
        labels[part > 0] = part[part > 0] + n
        n += count
    t, y, x = np.nonzero(labels)
    lab = labels[t, y, x]
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    safe = np.maximum(area, 1.0)
    cx = np.bincount(lab, weights=x + 0.5, minlength=n + 1)[1:] / safe
    cy = np.bincount(lab, weights=y + 0.5, minlength=n + 1)[1:] / safe
    dy = y + 0.5 - cy[lab - 1]
    var = np.bincount(lab, weights=dy**2, minlength=n + 1)[1:] / safe
    skew = np.bincount(lab, weights=dy**3, minlength=n + 1)[1:] / safe / np.maximum(var, 1e-6) ** 1.5
    pix = video[t, y, x].astype(np.float64)
    rgb = np.stack([np.bincount(lab, weights=pix[:, c], minlength=n + 1)[1:] / safe for c in range(3)], 1)
    frame = np.rint(np.bincount(lab, weights=t, minlength=n + 1)[1:] / safe).astype(np.int64)
    height, width = video.shape[1:3]
    box = np.stack([*_extent(lab, x, n, width), *_extent(lab, y, n, height)], 1)[:, [0, 2, 1, 3]]
    # x + y and x - y step by 1 per half diagonal pixel, so their extents over sqrt(2) are lengths in pixels
    diagonal = [np.subtract(*_extent(lab, u, n, width + height)[::-1]) for u in (x + y, x - y + height)]
    axes = (box[:, 2] - box[:, 0] + box[:, 3] - box[:, 1]) / 2
    corners = (diagonal[0] + diagonal[1]) / (2 * math.sqrt(2)) / np.maximum(axes, 1.0)
    keep = area >= MIN_AREA * scale(width) ** 2
    return Blobs(
        frame[keep], area[keep], np.stack([cx, cy], 1)[keep], box[keep], rgb[keep], skew[keep], corners[keep]
    )


def classify_shape(skew: float, corners: float) -> str:
    """Shape from the skewness of a blob's rows and how far its corners reach along the diagonals."""
    if skew < SKEW_TRIANGLE_BELOW:
        return "triangle"
    return "square" if corners > CORNERS_SQUARE_ABOVE else "circle"


def classify_speed(px_per_frame: float, size: int) -> str:
    """Speed class of a median displacement; "static" when the object does not move."""
    s = px_per_frame / scale(size)
    if s < STATIC_SPEED:
        return "static"
    return "slow" if s < SPEED_SPLIT else "fast"


@dataclass
class Track:
    """One object followed through a video; rows are NaN in frames where it was not found."""

    xy: np.ndarray
    """[T, 2] centroid."""
    area: np.ndarray
    """[T] pixels."""
    box: np.ndarray
    """[T, 4] bounding box x0, y0, x1, y1."""
    rgb: np.ndarray
    """[T, 3] mean colour."""
    skew: np.ndarray
    """[T] skewness of the blob's y."""
    corners: np.ndarray
    """[T] diagonal over axis extent of the blob."""


def track_objects(blobs: Blobs, num_frames: int, num_objects: int) -> list[Track]:
    """Follow the num_objects largest blobs of each frame, linking by position and hue."""
    tracks = [
        Track(
            np.full((num_frames, 2), np.nan),
            np.full(num_frames, np.nan),
            np.full((num_frames, 4), np.nan),
            np.full((num_frames, 3), np.nan),
            np.full(num_frames, np.nan),
            np.full(num_frames, np.nan),
        )
        for _ in range(num_objects)
    ]
    last: list[int | None] = [None] * num_objects
    order = np.lexsort((-blobs.area, blobs.frame))
    starts = np.searchsorted(blobs.frame[order], np.arange(num_frames + 1))
    for t in range(num_frames):
        idx = order[starts[t] : starts[t + 1]][:num_objects]
        if len(idx) == 0:
            continue
        cost = np.zeros((num_objects, len(idx)))
        for j, prev in enumerate(last):
            if prev is None:
                # an unseen track takes whatever the seen ones leave
                cost[j] = 1e3
                continue
            cost[j] = np.linalg.norm(blobs.xy[idx] - blobs.xy[prev], axis=1)
            a = blobs.rgb[idx] - blobs.rgb[idx].mean(1, keepdims=True)
            b = blobs.rgb[prev] - blobs.rgb[prev].mean()
            cos = a @ b / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b), 1e-6)
            # a hue change costs as much as a jump of 40 px, so crossing objects keep their identity
            cost[j] += 20.0 * (1.0 - cos)
        rows, cols = linear_sum_assignment(cost)
        for j, c in zip(rows, cols, strict=True):
            b = idx[c]
            tr = tracks[j]
            tr.xy[t], tr.area[t], tr.box[t] = blobs.xy[b], blobs.area[b], blobs.box[b]
            tr.rgb[t], tr.skew[t], tr.corners[t] = blobs.rgb[b], blobs.skew[b], blobs.corners[b]
            last[j] = b
    return tracks


def _majority(labels: list[str | None]) -> tuple[str | None, float]:
    known = [x for x in labels if x is not None]
    if not labels or not known:
        return None, 0.0
    value, n = Counter(known).most_common(1)[0]
    return value, n / len(labels)


def _moving_axes(d: np.ndarray, size: int) -> np.ndarray:
    """Which axes (x, y) carry motion, from valid displacements [N, 2]."""
    # a trimmed mean: the median misses motion that a lossy codec turned into steps of 0 and 2 px, the
    # mean is thrown by the few jumps of an occluded centroid
    mag = trim_mean(np.abs(d), 0.2, axis=0)
    # a diagonal moves both axes alike; a straight motion leaves only centroid jitter on the other axis
    return (mag >= 0.4 * mag.max()) & (mag >= 0.5 * STATIC_SPEED * scale(size))


def _signed_runs(values: np.ndarray, threshold: float) -> list[tuple[int, list[int]]]:
    """Runs of equal sign among entries with |value| > threshold: (sign, indices) in order."""
    runs: list[tuple[int, list[int]]] = []
    for i, v in enumerate(values):
        if not abs(v) > threshold:
            continue
        s = 1 if v > 0 else -1
        if runs and runs[-1][0] == s:
            runs[-1][1].append(i)
        else:
            runs.append((s, [i]))
    return runs


@dataclass
class Reversal:
    """A velocity component changing sign: where, on which axis, and whether a wall explains it."""

    axis: int
    before: int
    """Index of the last displacement with the old sign (displacement i goes from frame i to i + 1)."""
    after: int
    """Index of the first displacement with the new sign."""
    at_wall: bool
    speed_ratio: float | None
    """|displacement| a few frames after over a few frames before (1 for an elastic bounce)."""


def _reversals(track: Track, size: int, moving: np.ndarray, speed: float) -> list[Reversal]:
    d = np.diff(track.xy, axis=0)
    margin = 1.5 * speed + 1.0
    found = []
    for axis in np.flatnonzero(moving):
        comp = d[:, axis]
        mag = np.nanmean(np.abs(comp))
        runs = _signed_runs(np.nan_to_num(comp), 0.3 * mag)
        for (sign, old), (_, new) in pairwise(runs):
            i, j = old[-1], new[0]
            # the wall the object was heading for: x1/y1 against the far wall, x0/y0 against the near one
            boxes = track.box[max(i - 1, 0) : j + 3]
            if sign > 0:
                at_wall = bool(np.nanmax(boxes[:, 2 + axis], initial=-np.inf) >= size - margin)
            else:
                at_wall = bool(np.nanmin(boxes[:, axis], initial=np.inf) <= margin)
            # skip the displacements next to the turn: one of them holds a partial reflection
            before = np.abs(comp[max(i - 3, 0) : i])
            after = np.abs(comp[j + 1 : j + 4])
            before, after = before[~np.isnan(before)], after[~np.isnan(after)]
            ratio = None
            if len(before) and len(after) and np.median(before) > 0:
                ratio = float(np.median(after) / np.median(before))
            found.append(Reversal(int(axis), i, j, at_wall, ratio))
    return found


@dataclass
class ObjectReadout:
    """What the video shows of one object, read back from its track."""

    colour: str | None
    shape: str | None
    direction: str | None
    speed: str | None
    """Speed class, or "static"; None when the object was seen in fewer than 3 frames."""
    speed_px: float | None
    colour_consistency: float
    """Fraction of frames whose blob has the majority colour."""
    shape_consistency: float
    presence: float
    """Fraction of frames in which the object was found."""
    reversals: list[Reversal]
    track: Track


def _direction_name(signs: tuple[int, int]) -> str | None:
    for name, (ux, uy) in DIRECTIONS.items():
        if (int(np.sign(round(ux))), int(np.sign(round(uy)))) == signs:
            return name
    return None


def read_object(track: Track, size: int) -> ObjectReadout:
    """Colour, shape, direction and speed of a tracked object."""
    seen = ~np.isnan(track.area)
    colours = [classify_colour(track.rgb[t]) for t in np.flatnonzero(seen)]
    shapes = [classify_shape(track.skew[t], track.corners[t]) for t in np.flatnonzero(seen)]
    colour, colour_cons = _majority(colours)
    shape, shape_cons = _majority(shapes)
    d = np.diff(track.xy, axis=0)
    valid = ~np.isnan(d).any(1)
    direction = speed = None
    speed_px = None
    reversals: list[Reversal] = []
    if valid.sum() >= 2:
        dv = d[valid]
        speed_px = float(np.median(np.linalg.norm(dv, axis=1)))
        speed = classify_speed(speed_px, size)
        moving = _moving_axes(dv, size)
        if speed != "static" and moving.any():
            signs = [0, 0]
            for axis in np.flatnonzero(moving):
                comp = dv[:, axis]
                runs = _signed_runs(comp, 0.3 * np.abs(comp).mean())
                # the first run that lasts is the captioned direction; a one-frame run at the start is noise
                # or a bounce straight away
                lasting = [s for s, idx in runs if len(idx) >= 2]
                signs[axis] = lasting[0] if lasting else int(np.sign(comp.sum()))
            direction = _direction_name((signs[0], signs[1]))
            reversals = _reversals(track, size, moving, speed_px)
    return ObjectReadout(
        colour,
        shape,
        direction,
        speed,
        speed_px,
        colour_cons,
        shape_cons,
        float(seen.mean()),
        reversals,
        track,
    )


def read_video(
    video: np.ndarray, num_objects: int = 1, chunk_frames: int = CHUNK_FRAMES
) -> list[ObjectReadout]:
    """Track num_objects objects through a uint8 video [T, H, W, 3] and read each one back."""
    _check_video(video)
    blobs = find_blobs(video, foreground(video, chunk_frames))
    tracks = track_objects(blobs, len(video), num_objects)
    return [read_object(tr, video.shape[2]) for tr in tracks]


_ATTRIBUTES = ("colour", "shape", "direction", "speed")


def adherence(asked: list[PromptObject], seen: list[ObjectReadout]) -> dict[str, float | None]:
    """Per-attribute accuracy of what was seen against what was asked; None where nothing was asked."""

    def agreement(order) -> list[dict[str, bool]]:
        return [
            {a: getattr(p, a) == getattr(r, a) for a in _ATTRIBUTES if getattr(p, a) is not None}
            for p, r in zip(asked, order, strict=True)
        ]

    # objects are unordered: score the pairing of prompt objects and tracks that agrees best
    best = max(
        (agreement(order) for order in permutations(seen, len(asked))),
        key=lambda m: sum(sum(x.values()) for x in m),
    )
    out: dict[str, float | None] = {}
    for a in _ATTRIBUTES:
        hits = [m[a] for m in best if a in m]
        out[f"{a}_accuracy"] = float(np.mean(hits)) if hits else None
    out["all_accuracy"] = float(np.mean([all(m.values()) for m in best]))
    return out


def motion_metrics(seen: list[ObjectReadout]) -> dict[str, float | None]:
    """Trajectory smoothness away from bounces, and whether reversals are elastic bounces at walls."""
    accel, at_wall, ratios = [], [], []
    for r in seen:
        xy = r.track.xy
        if len(xy) < 3:
            continue
        a = np.linalg.norm(xy[2:] - 2 * xy[1:-1] + xy[:-2], axis=1)  # a[k] is centred on frame k + 1
        keep = ~np.isnan(a)
        for rev in r.reversals:
            # frames rev.before .. rev.after + 1 see the turn; only turns at a wall are real bounces,
            # so a trajectory that jerks back and forth in mid-air is still counted as rough
            if rev.at_wall:
                keep[max(rev.before - 1, 0) : rev.after + 1] = False
            at_wall.append(rev.at_wall)
            if rev.speed_ratio is not None:
                ratios.append(rev.speed_ratio)
        accel.extend(a[keep])
    return {
        "smoothness": float(np.mean(accel)) if accel else None,
        "reversals": float(len(at_wall)),
        "bounce_at_wall": float(np.mean(at_wall)) if at_wall else None,
        "bounce_speed_ratio": float(np.median(ratios)) if ratios else None,
    }


def consistency_metrics(
    video: np.ndarray, seen: list[ObjectReadout], blobs: Blobs, chunk_frames: int = CHUNK_FRAMES
) -> dict[str, float | None]:
    """Object count, size, colour and shape kept over time and across chunks."""
    counts = np.bincount(blobs.frame, minlength=len(video))
    area_cv, area_change = [], []
    for r in seen:
        area = r.track.area
        if np.isnan(area).all():
            continue
        area_cv.append(float(np.nanstd(area) / np.nanmean(area)))
        per_chunk = [area[sl] for sl in _chunks(len(video), chunk_frames)]
        per_chunk = [np.nanmean(c) for c in per_chunk if not np.isnan(c).all()]
        if len(per_chunk) >= 2:
            area_change.append(float(per_chunk[-1] / per_chunk[0] - 1.0))
    return {
        "count_fraction": float(np.mean(counts == len(seen))),
        "presence": float(np.mean([r.presence for r in seen])),
        "area_cv": float(np.mean(area_cv)) if area_cv else None,
        "area_chunk_change": float(np.mean(area_change)) if area_change else None,
        "colour_consistency": float(np.mean([r.colour_consistency for r in seen])),
        "shape_consistency": float(np.mean([r.shape_consistency for r in seen])),
    }


def _slope(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def drift_metrics(
    video: np.ndarray, mask: np.ndarray | None = None, chunk_frames: int = CHUNK_FRAMES
) -> dict[str, list[float]]:
    """Per-chunk mean saturation (0-1), brightness (0-1) and background noise (luma levels, 0-255)."""
    _check_video(video)
    if mask is None:
        mask = foreground(video, chunk_frames)
    x = video.astype(np.float32)
    hi, lo = _channel_max(x), _channel_min(x)
    saturation = (hi - lo) / np.maximum(hi, 1.0)
    luma = x @ _LUMA
    # the background texture is smooth, so what a 3x3 high-pass keeps off the objects is noise
    high = luma - ndimage.uniform_filter(luma, size=(1, 3, 3), mode="nearest")
    background = ndimage.maximum_filter(mask.view(np.uint8), size=(1, 5, 5)) == 0  # 2 px off objects
    out: dict[str, list[float]] = {"saturation": [], "brightness": [], "noise": []}
    for sl in _chunks(len(video), chunk_frames):
        out["saturation"].append(float(saturation[sl].mean()))
        out["brightness"].append(float(luma[sl].mean() / 255.0))
        bg = high[sl][background[sl]]
        out["noise"].append(float(np.sqrt(np.mean(bg**2))) if bg.size else float("nan"))
    return out


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def score_video(video: np.ndarray, prompt: str, chunk_frames: int = CHUNK_FRAMES) -> dict:
    """All metrics of one video against its prompt, as a flat JSON-serialisable dict."""
    _check_video(video)
    asked = parse_caption(prompt)
    mask = foreground(video, chunk_frames)
    blobs = find_blobs(video, mask)
    tracks = track_objects(blobs, len(video), len(asked))
    seen = [read_object(tr, video.shape[2]) for tr in tracks]
    drift = drift_metrics(video, mask, chunk_frames)
    out: dict = {"prompt": prompt, "num_frames": len(video)}
    out.update(adherence(asked, seen))
    out.update(motion_metrics(seen))
    out.update(consistency_metrics(video, seen, blobs, chunk_frames))
    for name, values in drift.items():
        finite = [v for v in values if math.isfinite(v)]
        out[f"{name}_mean"] = float(np.mean(finite)) if finite else None
        out[f"{name}_slope"] = _slope(finite)
        out[f"{name}_change"] = finite[-1] - finite[0] if finite else None
    out = {k: _clean(v) for k, v in out.items()}
    out["chunks"] = {k: [_clean(v) for v in vs] for k, vs in drift.items()}
    out["readout"] = [{a: getattr(r, a) for a in (*_ATTRIBUTES, "speed_px", "presence")} for r in seen]
    return out


def bootstrap_ci(values, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval (mean, low, high); NaNs for no values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(v.mean()), float(low), float(high)


def score_videos(
    videos, prompts: list[str], chunk_frames: int = CHUNK_FRAMES, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Score videos against their prompts: per-metric mean, bootstrap CI and count, plus per-chunk drift."""
    videos = list(videos)
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts; give one prompt per video")
    per_video = [score_video(v, p, chunk_frames) for v, p in zip(videos, prompts, strict=True)]
    summary = {}
    for key, value in per_video[0].items() if per_video else []:
        if isinstance(value, str | dict | list) or key == "num_frames":
            continue
        values = [pv[key] for pv in per_video if pv[key] is not None]
        mean, low, high = bootstrap_ci(values, n_boot, seed)
        summary[key] = {"mean": _clean(mean), "low": _clean(low), "high": _clean(high), "n": len(values)}
    # videos may differ in length, so chunk k is averaged over the videos that reach it
    per_chunk = {}
    for name in ("saturation", "brightness", "noise"):
        longest = max((len(pv["chunks"][name]) for pv in per_video), default=0)
        columns = [
            [pv["chunks"][name][k] for pv in per_video if k < len(pv["chunks"][name])] for k in range(longest)
        ]
        columns = [[v for v in col if v is not None] for col in columns]
        per_chunk[name] = {
            "mean": [float(np.mean(col)) if col else None for col in columns],
            "n": [len(col) for col in columns],
        }
    return {
        "num_videos": len(per_video),
        "chunk_frames": chunk_frames,
        "summary": summary,
        "per_chunk": per_chunk,
        "per_video": per_video,
    }
