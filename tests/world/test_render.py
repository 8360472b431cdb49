"""Renderer: determinism, variety, what the frames show, and the bounce physics."""

import time

import numpy as np
import pytest

from diagvid.world import COLOURS, ClipSpec, ObjectSpec, render, sample_spec, simulate, speed_px
from diagvid.world.render import position_bounds


def test_same_seed_same_frames():
    a, b = render(sample_spec(11, 20)), render(sample_spec(11, 20))
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.truth[0].positions, b.truth[0].positions)


def test_seeds_give_varied_clips():
    specs = [sample_spec(s, 2) for s in range(60)]
    objects = [o for spec in specs for o in spec.objects]
    assert len({o.colour for o in objects}) == 6
    assert len({o.shape for o in objects}) == 3
    assert len({o.direction for o in objects}) == 8
    assert len({o.speed for o in objects}) == 2
    assert len({spec.background_seed for spec in specs}) == 60
    assert not np.array_equal(render(specs[0]).frames, render(specs[1]).frames)


def test_frames_show_the_truth():
    spec = ClipSpec([ObjectSpec("square", "green", "right", "slow", (20.0, 30.0), 8.0)], 3, 10)
    clip = render(spec)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (10, 64, 64, 3)
    for t in (0, 9):
        x, y = clip.truth[0].positions[t]
        assert tuple(clip.frames[t, int(y), int(x)]) == COLOURS["green"]
    # the object moved 9 px right: its old left edge is background again
    assert tuple(clip.frames[9, 30, 13]) != COLOURS["green"]
    np.testing.assert_allclose(clip.truth[0].positions[9], (29.0, 30.0))
    # the background is grey: low chroma everywhere the object is not
    bg = clip.frames[0].astype(int)
    chroma = bg.max(-1) - bg.min(-1)
    assert chroma[:, 40:].max() < 40 and 80 < bg[:, 40:].mean() < 180


def test_bounces_keep_objects_in_frame_and_reflect_velocity():
    obj = ObjectSpec("triangle", "red", "down-left", "fast", (40.0, 30.0), 9.0)
    truth = simulate(obj, 810, 64)  # ten times the 81-frame clip length
    (x_lo, x_hi), (y_lo, y_hi) = position_bounds("triangle", 9.0, 64)
    xy = truth.positions
    assert (xy[:, 0] >= x_lo).all() and (xy[:, 0] <= x_hi).all()
    assert (xy[:, 1] >= y_lo).all() and (xy[:, 1] <= y_hi).all()
    assert len(truth.bounces) > 40
    np.testing.assert_allclose(np.linalg.norm(truth.velocities, axis=1), speed_px("fast", 64))
    for t, axis in truth.bounces:
        a = "xy".index(axis)
        assert truth.velocities[t, a] == -truth.velocities[t - 1, a]
        # the wall is within one step of where the bounce happened
        lo, hi = (x_lo, x_hi) if a == 0 else (y_lo, y_hi)
        assert min(xy[t, a] - lo, hi - xy[t, a]) <= speed_px("fast", 64)
    free = [t for t in range(809) if all(b[0] != t + 1 for b in truth.bounces)]
    np.testing.assert_allclose(xy[1:][free] - xy[:-1][free], truth.velocities[free])


def test_long_clip_renders_fast_and_stays_in_frame():
    spec = sample_spec(4, 810)
    clip = render(spec)
    assert clip.frames.shape[0] == 810
    # every frame still shows the object, so it never left the picture
    colour = np.array(COLOURS[spec.objects[0].colour])
    assert (clip.frames == colour).all(-1).any((1, 2)).all()
    short = sample_spec(4, 81)
    best = min(_time(lambda: render(short)) for _ in range(3))
    assert best < 0.1, f"rendering 81 frames took {best:.3f} s"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match=r"shape='star'.*circle, square, triangle"):
        ObjectSpec("star", "red", "up", "slow", (30.0, 30.0), 8.0)
    with pytest.raises(ValueError, match="colour='purple'"):
        ObjectSpec("circle", "purple", "up", "slow", (30.0, 30.0), 8.0)
    with pytest.raises(ValueError, match="outside"):
        ClipSpec([ObjectSpec("circle", "red", "up", "slow", (3.0, 30.0), 8.0)], 0, 10)
