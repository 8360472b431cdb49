"""FVD-world: the Fréchet distance against closed forms, and the shipped network on real and corrupted clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

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
