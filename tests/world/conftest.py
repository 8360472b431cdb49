"""Toy-world fixtures: the held-out reference clips and their scores, rendered once per session."""

import pytest

from diagvid.world import Clip, caption, eval_specs, render, score_videos

# short clips keep the suite fast; 24 frames still hold at least one bounce for most of them
NUM_FRAMES = 24


@pytest.fixture(scope="session")
def heldout() -> list[Clip]:
    """The 48 held-out single-object clips, rendered."""
    return [render(spec) for spec in eval_specs("heldout-48", num_frames=NUM_FRAMES)]


@pytest.fixture(scope="session")
def real_scores(heldout: list[Clip]) -> dict:
    """score_videos on the held-out clips against their own captions."""
    return score_videos([c.frames for c in heldout], [caption(c.spec) for c in heldout], n_boot=200)
