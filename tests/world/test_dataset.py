"""Dataset: seeded specs, the endless dataset, and the held-out evaluation sets."""

import numpy as np
import pytest
import torch

from diagvid.world import (
    COLOURS,
    DIRECTIONS,
    EVAL_SEED_BASE,
    SHAPES,
    TRAIN_SEED_LIMIT,
    WorldDataset,
    caption,
    eval_prompts,
    eval_specs,
    frames_to_tensor,
    parse_caption,
    render,
    sample_spec,
    spec_from_prompt,
    tensor_to_frames,
)
from diagvid.world.dataset import MIN_FRAMES_BEFORE_BOUNCE


def test_sample_spec_is_deterministic():
    assert sample_spec(7, 17) == sample_spec(7, 17)
    assert sample_spec(7, 17) != sample_spec(8, 17)


def test_two_objects_as_often_as_asked():
    counts = [len(sample_spec(s, 1).objects) for s in range(400)]
    assert 0.18 < counts.count(2) / 400 < 0.32
    assert all(len(sample_spec(s, 1, p_two=0.0).objects) == 1 for s in range(50))
    pairs = [sample_spec(s, 1, p_two=1.0).objects for s in range(50)]
    assert all(len(p) == 2 and p[0].colour != p[1].colour for p in pairs)


def test_opening_frames_show_the_captioned_direction():
    for seed in range(100):
        truth = render(sample_spec(seed, 12)).truth
        assert all(t.bounces == [] or t.bounces[0][0] > MIN_FRAMES_BEFORE_BOUNCE for t in truth)


def test_spec_from_prompt_does_what_was_asked():
    spec = spec_from_prompt("a red circle moves left", seed=3, num_frames=12)
    obj = spec.objects[0]
    assert (obj.colour, obj.shape, obj.direction) == ("red", "circle", "left")
    clip = render(spec)
    assert clip.truth[0].positions[5, 0] < clip.truth[0].positions[0, 0]


def test_eval_sets_cover_the_world_and_are_fixed():
    prompts = eval_prompts("heldout-48")
    assert prompts == eval_prompts("heldout-48") and len(prompts) == 48 == len(set(prompts))
    asked = [parse_caption(p) for p in prompts]
    assert all(len(a) == 1 for a in asked)
    objs = [a[0] for a in asked]
    assert {o.colour for o in objs} == set(COLOURS) and {o.shape for o in objs} == set(SHAPES)
    assert {(o.direction, o.speed) for o in objs} == {(d, s) for d in DIRECTIONS for s in ("slow", "fast")}
    quick = [parse_caption(p)[0] for p in eval_prompts("heldout-8")]
    assert {o.direction for o in quick} == set(DIRECTIONS) and {o.speed for o in quick} == {"slow", "fast"}
    with pytest.raises(ValueError, match="heldout-48"):
        eval_prompts("heldout-9")


def test_eval_seeds_are_not_training_seeds():
    assert EVAL_SEED_BASE >= TRAIN_SEED_LIMIT
    ds = WorldDataset(num_frames=2)
    assert len(ds) == TRAIN_SEED_LIMIT
    with pytest.raises(IndexError):
        ds[TRAIN_SEED_LIMIT]
    with pytest.raises(IndexError):
        WorldDataset(num_frames=2, seed_offset=10)[TRAIN_SEED_LIMIT - 10]
    # the eval clips are not the first training clips either
    train_starts = {sample_spec(s, 1).objects[0].start_xy for s in range(500)}
    assert not train_starts & {s.objects[0].start_xy for s in eval_specs("heldout-48", 1)}


def test_dataset_items():
    ds = WorldDataset(num_frames=9)
    video, text = ds[5]
    assert video.shape == (3, 9, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.std() > 0.05
    assert parse_caption(text)
    assert torch.equal(ds[5][0], video)
    first = next(iter(ds))
    assert torch.equal(first[0], ds[0][0])
    frames, _ = WorldDataset(num_frames=9, as_uint8=True)[5]
    assert frames.dtype == np.uint8 and frames.shape == (9, 64, 64, 3)
    np.testing.assert_array_equal(tensor_to_frames(frames_to_tensor(frames)), frames)


def test_eval_draws_are_independent_clips_of_the_same_prompts():
    base, other = eval_specs("heldout-8", 1), eval_specs("heldout-8", 1, draw=1)
    assert base == eval_specs("heldout-8", 1, draw=0)
    assert [caption(s) for s in other] == [caption(s) for s in base] == eval_prompts("heldout-8")
    assert all(a.objects[0].start_xy != b.objects[0].start_xy for a, b in zip(base, other, strict=True))
    with pytest.raises(ValueError, match=r"draw=100 must be in \[0, 100\)"):
        eval_specs("heldout-8", 1, draw=100)
