"""Every shipped recipe loads into its config class (typos in configs/ fail here, not after an hour)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagvid.config import load_config
from diagvid.train.distill import DistillConfig
from diagvid.train.features import FeaturesTrainConfig
from diagvid.train.motion import MotionTrainConfig
from diagvid.train.ode import OdeConfig
from diagvid.train.ode_init import InitConfig
from diagvid.train.teacher import TeacherConfig
from diagvid.train.tiny_decoder import TinyDecoderTrainConfig
from diagvid.train.vae import VAETrainConfig

ROOT = Path(__file__).resolve().parents[1] / "configs"
KINDS = {
    "vae": VAETrainConfig,
    "vae-stream": VAETrainConfig,
    "vae-decoder": VAETrainConfig,
    "vae-decoder-robust": VAETrainConfig,
    "vae-decoder-edge": VAETrainConfig,
    "vae-anchored": VAETrainConfig,
    "vae-decoder-wide": VAETrainConfig,
    "vae-z16": VAETrainConfig,
    "vae-z16-decay": VAETrainConfig,
    "vae-decoder-edge2": VAETrainConfig,
    "teacher": TeacherConfig,
    "teacher-contrast": TeacherConfig,
    "teacher-deep": TeacherConfig,
    "teacher-high": TeacherConfig,
    "teacher-high-tuned": TeacherConfig,
    "teacher-high-tuned-z16": TeacherConfig,
    "teacher-high-contrast": TeacherConfig,
    "teacher-high-anchor": TeacherConfig,
    "teacher-high-stem": TeacherConfig,
    "teacher-i2v-high": TeacherConfig,
    "teacher-low": TeacherConfig,
    "teacher-low-z16": TeacherConfig,
    "ode": OdeConfig,
    "ode-pair": OdeConfig,
    "init": InitConfig,
    "init-pair": InitConfig,
    "distill-diagonal": DistillConfig,
    "distill-self-forcing": DistillConfig,
    "distill-causvid": DistillConfig,
    "distill-diagonal-noflow": DistillConfig,
    "distill-diagonal-nodf": DistillConfig,
    "distill-diagonal-nodf-pair": DistillConfig,
    "distill-schedule-only": DistillConfig,
    "features": FeaturesTrainConfig,
    "motion": MotionTrainConfig,
    "motion-axes": MotionTrainConfig,
    "realness": MotionTrainConfig,
    "realness-direction": MotionTrainConfig,
    "tiny-decoder": TinyDecoderTrainConfig,
    "tiny-decoder-edge": TinyDecoderTrainConfig,
}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*/*.toml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads(path):
    kind = path.stem
    assert kind in KINDS, f"no config class registered for recipe {path.name}"
    load_config(KINDS[kind], path)
