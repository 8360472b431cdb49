"""The motion classifier and its classifier guidance: shapes, errors, the gradient against finite
differences, and a sampler that it steers."""

from __future__ import annotations

import pytest
import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.model.motion import MotionClassifier, MotionClassifierConfig, MotionGuidance, prompt_label
from diagvid.sampling import sample_euler
from diagvid.world.render import DIRECTIONS
from tests.conftest import randomize, tiny_inputs

CLASSES = list(DIRECTIONS)


def _classifier(in_dim: int = 4, frames: int = 3, seed: int = 0) -> MotionClassifier:
    torch.manual_seed(seed)
    cfg = MotionClassifierConfig(in_dim=in_dim, frames=frames, width=8, groups=2, freq_dim=8, hidden=16)
    return randomize(MotionClassifier(cfg), seed=seed, std=0.3).eval()


def test_logits_per_class_and_clear_errors():
    clf = _classifier()
    x = torch.randn(2, 4, 5, 4, 6)
    assert clf(x, torch.tensor([0.5, 0.9])).shape == (2, len(CLASSES))
    # log_prob is each sample's class log-probability, 0 for an unguided (-1) label
    logp = torch.log_softmax(clf(x, torch.tensor(0.5)), 1)
    want = torch.stack([logp[0, 3], torch.tensor(0.0)])
    torch.testing.assert_close(clf.log_prob(x, 0.5, torch.tensor([3, -1])), want)
    # only the first `frames` latent frames are read
    y = x.clone()
    y[:, :, 3:] = 7.0
    torch.testing.assert_close(clf(x, torch.tensor(0.5)), clf(y, torch.tensor(0.5)))
    # the noise level is an input: the same latents read differently at another level
    assert not torch.allclose(clf(x, torch.tensor(0.2)), clf(x, torch.tensor(0.9)))
    with pytest.raises(ValueError, match=r"expected \[B, 4, F >= 3, h, w\]"):
        clf(torch.randn(2, 4, 2, 4, 4), torch.tensor(0.5))
    with pytest.raises(ValueError, match="multiple of groups"):
        MotionClassifierConfig(width=10, groups=4)


def test_save_and_load_round_trip(tmp_path):
    clf = _classifier()
    clf.save(tmp_path / "motion")
    back = MotionClassifier.load(tmp_path / "motion")
    x = torch.randn(1, 4, 3, 4, 4)
    torch.testing.assert_close(back(x, torch.tensor(0.7)), clf(x, torch.tensor(0.7)), rtol=0, atol=0)
    assert back.cfg == clf.cfg


def test_prompt_labels():
    assert prompt_label("a red circle moves up-left fast", CLASSES) == CLASSES.index("up-left")
    assert prompt_label("a yellow circle and a blue circle move down fast", CLASSES) == CLASSES.index("down")
    assert prompt_label("a blue square moves left fast and a green square moves down fast", CLASSES) == -1
    with pytest.raises(ValueError, match="unknown word 'sideways'"):
        prompt_label("a red circle moves sideways", CLASSES)
    with pytest.raises(ValueError, match="not a motion class"):
        prompt_label("a red circle moves left", ["up", "down"])


def test_guidance_is_the_score_term_of_the_log_probability():
    """v shift = -scale sigma / (1 - sigma) d log p(y | x) / dx, checked by central differences."""
    clf = _classifier().double()
    x = torch.randn(2, 4, 4, 2, 2, dtype=torch.float64)
    labels = torch.tensor([3, -1])
    guide = MotionGuidance(clf, labels, scale=2.0, sigma_min=0.5)
    sigma = 0.8
    shift = guide.velocity_shift(x, sigma)
    assert shift.dtype == x.dtype
    assert torch.count_nonzero(shift[1]) == 0  # label -1: unguided
    assert torch.count_nonzero(shift[0, :, 3:]) == 0  # the frames the classifier does not read
    factor = -2.0 * sigma / (1 - sigma)

    @torch.no_grad()
    def logp(z):
        return torch.log_softmax(clf(z[:1], torch.tensor(sigma, dtype=torch.float64)), 1)[0, 3]

    eps = 1e-5
    for idx in [(0, 0, 0, 0, 0), (0, 3, 2, 1, 0), (0, 1, 1, 0, 1)]:
        up, down = x.clone(), x.clone()
        up[idx] += eps
        down[idx] -= eps
        numeric = (logp(up) - logp(down)) / (2 * eps)
        assert float(shift[idx]) == pytest.approx(factor * numeric.item(), rel=1e-4, abs=1e-9)
    # the first step, at sigma 1, stays finite: 1 - sigma is floored
    assert torch.isfinite(guide.velocity_shift(x, 1.0)).all()
    assert guide.applies(0.5) and not guide.applies(0.49)
    with pytest.raises(ValueError, match="labels of shape"):
        MotionGuidance(clf, torch.tensor([1, 2, 3])).velocity_shift(x, 0.7)
    with pytest.raises(ValueError, match=r"scale -1\.0"):
        MotionGuidance(clf, labels, scale=-1.0)


def test_the_sampler_is_steered_toward_the_asked_class_and_untouched_at_scale_zero():
    torch.manual_seed(0)
    dit = randomize(WanDiT(preset("tiny")), seed=3).eval()
    x, _, ctx = tiny_inputs(dit, batch=2, frames=4)
    null = torch.zeros_like(ctx)
    clf = _classifier(frames=3, seed=1)
    labels = torch.tensor([0, 5])
    steps = dict(num_steps=8, shift=3.0, guidance=2.0)
    plain, _ = sample_euler(dit, x, ctx, null, **steps)
    off, _ = sample_euler(dit, x, ctx, null, **steps, motion_guidance=MotionGuidance(clf, labels, scale=0.0))
    torch.testing.assert_close(off, plain, rtol=0, atol=0)

    def p_asked(scale: float) -> torch.Tensor:
        guide = MotionGuidance(clf, labels, scale=scale, sigma_min=0.3)
        z, _ = sample_euler(dit, x, ctx, null, **steps, motion_guidance=guide)
        with torch.no_grad():
            return torch.softmax(clf(z, torch.tensor(0.0)), 1).gather(1, labels[:, None])[:, 0]

    # the final samples read more like the asked class the stronger the guidance (a random classifier)
    weak, strong, stronger = p_asked(0.0), p_asked(100.0), p_asked(400.0)
    assert (strong > weak + 0.02).all() and (stronger > strong + 0.02).all(), (weak, strong, stronger)
