"""Feature-network training: labels follow the ground truth, the run resumes exactly, and it exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diagvid.config import from_dict
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.features import FeaturesTrainConfig, direction_of, train_features, window_labels
from diagvid.world import DIRECTIONS, ClipSpec, ObjectSpec, render
from diagvid.world.features import FeatureNet


def recipe(out) -> FeaturesTrainConfig:
    return from_dict(
        FeaturesTrainConfig,
        {
            "model": {"frames": 4, "size": 8, "widths": [4, 8], "groups": 2},
            "steps": 3,
            "batch_size": 2,
            "clip_frames": 6,
            "size": 16,
            "eval_draws": 1,
            "stats_batches": 2,
            "out_dir": str(out),
            "log_every": 1,
            "ckpt_every": 1,
            "eval_every": 3,
        },
    )


def test_resume_is_bit_identical_and_the_export_loads(tmp_path):
    straight = train_features(recipe(tmp_path / "a"), progress=False)
    train_features(recipe(tmp_path / "b"), max_steps=1, progress=False)
    resumed = train_features(recipe(tmp_path / "b"), progress=False)
    a = load_checkpoint(tmp_path / "a/checkpoint.pt")["state"]
    b = load_checkpoint(tmp_path / "b/checkpoint.pt")["state"]
    for part in ("net", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    torch.testing.assert_close(straight(x), resumed(x), rtol=0, atol=0)
    # the features are standardised on 2 batches of 2 unseen windows: not the identity any more
    assert not torch.equal(straight.feature_std, torch.ones(4 + 8))
    last = json.loads((tmp_path / "b/log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and set(last["eval"]) == {"colour", "shape", "direction", "speed", "all"}
    loaded = FeatureNet.load(straight.save(tmp_path / "export"))
    torch.testing.assert_close(loaded(x), straight(x), rtol=0, atol=0)


def test_direction_label_follows_the_bounce():
    # a fast object heading right from near the wall bounces within the first frames
    spec = ClipSpec([ObjectSpec("square", "red", "up-right", "fast", (50.0, 32.0), 8.0)], 0, 12)
    clip = render(spec)
    classes = recipe("unused").model.classes
    first = window_labels(clip, 0, classes)
    assert classes["direction"][first["direction"]] == "up-right"
    bounced = next(t for t in range(12) if clip.truth[0].velocities[t][0] < 0)
    after = window_labels(clip, bounced, classes)
    assert classes["direction"][after["direction"]] == "up-left"
    assert {k: v for k, v in first.items() if k != "direction"} == {
        k: v for k, v in after.items() if k != "direction"
    }
    for name, unit in DIRECTIONS.items():
        assert direction_of(2.5 * np.array(unit)) == name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clip_frames": 10}, "clip_frames=10 must be at least model.frames=16"),
        ({"p_two": 1.5}, "p_two=1.5 must be a probability"),
        ({"model": {"widths": [6, 8]}}, r"widths=\(6, 8\) must be positive multiples of groups=4"),
        ({"model": {"frames": 12}}, "frames=12 must be a positive multiple of 8"),
        ({"model": {"size": 40}}, "size=40 must be a positive multiple of 16"),
        ({"stats_batches": 0}, "stats_batches=0 must be >= 1"),
    ],
)
def test_bad_recipes(changes, message):
    with pytest.raises(ValueError, match=message):
        from_dict(FeaturesTrainConfig, changes)


def test_cli_trains_reports_held_out_accuracy_and_exports(tmp_path):
    from typer.testing import CliRunner

    from diagvid.cli import app

    tiny = recipe(tmp_path / "run")
    sets = [
        "model.frames=4",
        "model.size=8",
        "model.widths=[4, 8]",
        "model.groups=2",
        "steps=2",
        "batch_size=2",
        "clip_frames=6",
        "size=16",
        "eval_draws=1",
        "stats_batches=1",
        f"out_dir='{tiny.out_dir}'",
    ]
    shipped = Path(__file__).resolve().parents[2] / "configs/toy/features.toml"
    args = ["train", "features", "--config", str(shipped), "--export", str(tmp_path / "net")]
    result = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    assert "held-out accuracy colour" in result.output and "wrote" in result.output
    assert FeatureNet.load(tmp_path / "net").cfg.widths == (4, 8)
