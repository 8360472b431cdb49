"""FVD-world: the Fréchet distance against closed forms, and the shipped network on real and corrupted clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from diagvid.assets import asset_dir
from diagvid.train.features import FeaturesTrainConfig, accuracy, heldout_windows
from diagvid.world import eval_specs, render
from diagvid.world.features import (
    FeatureNet,
    FeatureNetConfig,
    frechet_distance,
    gaussian_frechet,
    to_input,
    video_features,
    windows,
)

# ----- the distance -----------------------------------------------------------------------------------------


def _diagonal_closed_form(mu_a, var_a, mu_b, var_b) -> float:
    """Gaussians with diagonal covariances: the root of the product is the product of the roots, per axis."""
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b)))


def test_gaussian_frechet_matches_the_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    var_a, var_b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    got = gaussian_frechet(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(_diagonal_closed_form(mu_a, var_a, mu_b, var_b), rel=1e-10)


def test_gaussian_frechet_matches_commuting_covariances_in_a_rotated_basis():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # the same eigenvectors: the matrices commute
    var_a, var_b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    cov_a, cov_b = q @ np.diag(var_a) @ q.T, q @ np.diag(var_b) @ q.T
    mu = rng.normal(size=6)
    got = gaussian_frechet(mu, cov_a, np.zeros(6), cov_b)
    assert got == pytest.approx(_diagonal_closed_form(mu, var_a, np.zeros(6), var_b), rel=1e-9)


def test_gaussian_frechet_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
    root = linalg.sqrtm(cov_a @ cov_b).real
    want = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    assert gaussian_frechet(mu_a, cov_a, mu_b, cov_b) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # a shift moves only the mean term
    assert frechet_distance(x, x + np.array([3.0, 0, 0, 0])) == pytest.approx(9.0, rel=1e-9)
    # scaling a whole set by s gives (1 - s)^2 tr(cov)
    cov = np.cov(x, rowvar=False)
    assert frechet_distance(x - x.mean(0), 2 * (x - x.mean(0))) == pytest.approx(np.trace(cov), rel=1e-9)
    # torch tensors and float32 are accepted and give the same number
    assert frechet_distance(torch.tensor(x), torch.tensor(x + 1.0)) == pytest.approx(4.0, rel=1e-9)


def test_frechet_distance_with_singular_covariances_is_finite():
    """Fewer samples than dimensions (rank-deficient covariances) and a constant feature are fine."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
    a[:, 0] = b[:, 0] = 1.0
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (
            np.zeros((1, 3)),
            np.zeros((5, 3)),
            r"feats_a must be features \[N, D\] with N >= 2 samples; got shape \(1, 3\)",
        ),
        (np.zeros((5, 3)), np.zeros(5), r"feats_b must be features \[N, D\].*got shape \(5,\)"),
        (np.zeros((5, 3)), np.zeros((5, 4)), "feature widths differ: feats_a has D=3, feats_b D=4"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "feats_a holds 15 non-finite values"),
    ],
)
def test_frechet_distance_rejects_bad_features(a, b, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(a, b)


# ----- videos -> features ---------------------------------------------------------------------------------


def test_windows_are_consecutive_and_area_resampled():
    video = np.random.default_rng(0).integers(0, 256, (37, 64, 64, 3), dtype=np.uint8)
    w = windows(video, 16)
    assert w.shape == (2, 16, 64, 64, 3)
    np.testing.assert_array_equal(w[1, 0], video[16])  # the last 37 mod 16 frames are left out
    x = to_input(w, 32)
    assert x.shape == (2, 3, 16, 32, 32)
    pooled = video[16, :2, :2, 0].astype(np.float64).mean() / 127.5 - 1.0
    assert float(x[1, 0, 0, 0, 0]) == pytest.approx(pooled, abs=1e-6)


@pytest.mark.parametrize(
    ("video", "message"),
    [
        (
            np.zeros((16, 64, 64, 3), np.float32),
            r"expected a uint8 video \[T, H, W, 3\], got float32 of shape \(16, 64, 64, 3\)",
        ),
        (np.zeros((16, 64, 64), np.uint8), r"got uint8 of shape \(16, 64, 64\)"),
        (np.zeros((16, 64, 64, 4), np.uint8), r"got uint8 of shape \(16, 64, 64, 4\)"),
        (
            torch.zeros(16, 64, 64, 3, dtype=torch.uint8),
            r"got torch.uint8 of shape torch.Size\(\[16, 64, 64, 3\]\)",
        ),
        (np.zeros((9, 64, 64, 3), np.uint8), "the video has 9 frames; the feature network needs at least 16"),
    ],
)
def test_bad_videos_are_named(video, message):
    with pytest.raises(ValueError, match=message):
        video_features(FeatureNet(), [video])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(widths=(8, 8, 8, 16)))
    net.feature_mean.normal_()
    folder = net.save(tmp_path / "net")
    assert sorted(p.name for p in folder.iterdir()) == ["features.json", "features.safetensors"]
    loaded = FeatureNet.load(folder)
    assert loaded.cfg == net.cfg
    video = np.random.default_rng(1).integers(0, 256, (32, 48, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(video_features(loaded, [video]), video_features(net, [video]))
    # a folder of another architecture is refused, naming what does not fit
    FeatureNet(FeatureNetConfig(widths=(8, 8, 8, 8))).save(tmp_path / "other")
    (tmp_path / "other/features.json").write_text((folder / "features.json").read_text())
    with pytest.raises(ValueError, match=r"features.safetensors does not fit FeatureNetConfig.*wrong shape"):
        FeatureNet.load(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"features\.json not found"):
        FeatureNet.load(tmp_path)


# ----- the shipped network ----------------------------------------------------------------------------------

FRAMES = 48  # three windows per clip: 144 samples per set of the 48 held-out prompts


@pytest.fixture(scope="module")
def shipped() -> FeatureNet:
    return FeatureNet.load(asset_dir("toy/features"))


@pytest.fixture(scope="module")
def clips() -> dict[int, list[np.ndarray]]:
    """Draws 0-2 of the 48 held-out prompts: 0 is the reference, 1 and 2 independent real sets."""
    return {d: [render(s).frames for s in eval_specs("heldout-48", FRAMES, draw=d)] for d in range(3)}


@pytest.fixture(scope="module")
def reference(shipped, clips) -> np.ndarray:
    return video_features(shipped, clips[0])


def _saturate(video: np.ndarray, gain: float) -> np.ndarray:
    x = video.astype(np.float32)
    grey = x.mean(-1, keepdims=True)
    return np.clip(grey + (x - grey) * gain, 0, 255).astype(np.uint8)


def _rotate_hue(video: np.ndarray, degrees: float) -> np.ndarray:
    """Turn every colour about the grey axis: 30 degrees puts the palette's hues halfway between each other."""
    x = video.astype(np.float32)
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    rot = np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * cross @ cross
    return np.clip(x @ rot.T, 0, 255).astype(np.uint8)


_rng = np.random.default_rng(0)
CORRUPTIONS = {
    "frozen frames": lambda v: np.repeat(v[:1], len(v), 0),
    "shuffled frames": lambda v: v[_rng.permutation(len(v))],
    "added noise": lambda v: np.clip(v + _rng.normal(0, 8, v.shape), 0, 255).astype(np.uint8),
    "oversaturated colours": lambda v: _saturate(v, 1.3),
    "wrong colour, off the palette": lambda v: _rotate_hue(v, 30),
    # rotating the channels sends each palette colour near another one (red -> blue, green -> orange ...):
    # on a colour-balanced set only the imperfect match and the colour-shape pairings can show
    "wrong colour, palette swapped": lambda v: v[..., [1, 2, 0]],
}
# Measured with the shipped network (48 prompts x 3 windows = 144 samples a set): floors 2.5-2.9 over draws
# 1-4; frozen 25.9, shuffled 16.6, noise 8.6, saturation 6.5, hue 6.4, channels 5.3, i.e. 1.8x-9x the
# largest floor. The bars leave a margin for the random draws.
FLOOR_AT_MOST = 4.0
WORSE_BY = {
    "frozen frames": 5.0,
    "shuffled frames": 3.5,
    "added noise": 2.0,
    "oversaturated colours": 1.6,
    "wrong colour, off the palette": 1.6,
    "wrong colour, palette swapped": 1.4,
}


def test_real_clips_score_the_floor_and_every_corruption_is_clearly_worse(shipped, clips, reference):
    floor = frechet_distance(reference, video_features(shipped, clips[1]))
    again = frechet_distance(reference, video_features(shipped, clips[2]))
    assert reference.shape == (48 * 3, 48)
    assert frechet_distance(reference, reference) == pytest.approx(0.0, abs=1e-8)
    # the floor is the finite-sample distance of real clips: two independent draws agree on it
    assert 0 < floor < FLOOR_AT_MOST and 0 < again < FLOOR_AT_MOST
    for name, corrupt in CORRUPTIONS.items():
        d = frechet_distance(reference, video_features(shipped, [corrupt(v) for v in clips[1]]))
        assert d > WORSE_BY[name] * max(floor, again), (name, d, floor, again)


def test_shipped_network_reads_the_world_on_held_out_clips(shipped):
    """Held-out accuracy on one window of each of 96 held-out clips (2 draws of the 48 prompts).

    `diagvid train features` measured 1.000 / 0.995 / 0.969 / 1.000 (colour / shape / direction / speed) on
    192 such windows; direction misses are windows that start at a bounce.
    """
    cfg = FeaturesTrainConfig(model=shipped.cfg, eval_draws=2)
    acc = accuracy(shipped, *heldout_windows(cfg))
    assert acc["colour"] >= 0.98 and acc["speed"] >= 0.98
    assert acc["shape"] >= 0.95 and acc["direction"] >= 0.9 and acc["all"] >= 0.88, acc
