"""The motion classifier and its classifier guidance: shapes, errors, the gradient against finite
differences, and a sampler that it steers."""

from __future__ import annotations

import pytest
import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.model.motion import (
    TARGETS,
    MotionClassifier,
    MotionClassifierConfig,
    MotionGuidance,
    prompt_label,
)
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
    with pytest.raises(ValueError, match=r"expected \[B, C >= 4, F >= 3, h, w\]"):
        clf(torch.randn(2, 4, 2, 4, 4), torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"latents of shape \(2, 3, 5, 4, 6\): expected \[B, C >= 4"):
        clf(x[:, :3], torch.tensor(0.5))
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


def _window_classifier(windows: list[int], frames: int = 2) -> MotionClassifier:
    torch.manual_seed(0)
    cfg = MotionClassifierConfig(
        in_dim=4,
        frames=frames,
        width=8,
        groups=2,
        freq_dim=8,
        hidden=16,
        target="axis-speed",
        classes=list(TARGETS["axis-speed"]),
        windows=windows,
    )
    return randomize(MotionClassifier(cfg), seed=0, std=0.3).eval()


def test_windows_sum_their_log_probabilities_and_guidance_spans_them():
    clf = _window_classifier([0, 2, 3]).double()
    assert clf.cfg.span == 5
    x = torch.randn(2, 4, 6, 2, 2, dtype=torch.float64)
    sigma = torch.tensor(0.6, dtype=torch.float64)
    want = sum(torch.log_softmax(clf(x[:, :, w : w + 2].clone(), sigma), 1) for w in (0, 2, 3))
    torch.testing.assert_close(clf.class_log_probs(x, 0.6), want)
    torch.testing.assert_close(clf.log_prob(x, 0.6, torch.tensor([4, 1])), want[[0, 1], [4, 1]])
    with pytest.raises(ValueError, match=r"latents of 4 frames; windows \[0, 2, 3\] of 2 frames read 5"):
        clf.class_log_probs(x[:, :, :4], 0.6)
    # the guidance gradient reaches every frame of the windows and none after them
    shift = MotionGuidance(clf, torch.tensor([4, 1]), scale=1.0).velocity_shift(x, 0.6)
    assert torch.count_nonzero(shift[:, :, 5:]) == 0
    assert all(torch.count_nonzero(shift[:, :, f]) > 0 for f in range(5))
    idx, eps = (1, 2, 4, 0, 1), 1e-5  # a frame only the last window reads
    up, down = x.clone(), x.clone()
    up[idx] += eps
    down[idx] -= eps
    with torch.no_grad():
        numeric = (
            clf.log_prob(up, 0.6, torch.tensor([4, 1])) - clf.log_prob(down, 0.6, torch.tensor([4, 1]))
        )[1]
    assert float(shift[idx]) == pytest.approx(-0.6 / 0.4 * numeric.item() / (2 * eps), rel=1e-4)


def test_config_names_its_target_classes_and_increasing_windows():
    with pytest.raises(ValueError, match="target='speed': allowed: direction, axis-speed"):
        MotionClassifierConfig(target="speed")
    with pytest.raises(ValueError, match=r"classes \['up', 'down'\] are not axis-speed classes"):
        MotionClassifierConfig(target="axis-speed", classes=["up", "down", "vertical fast"])
    for bad in ([], [-1, 3], [3, 0], [0, 0]):
        with pytest.raises(ValueError, match="increasing first latent frames"):
            MotionClassifierConfig(windows=bad)


def test_axis_speed_labels_hold_over_the_sign_and_need_a_speed():
    classes = TARGETS["axis-speed"]

    def label(prompt: str) -> str | None:
        i = prompt_label(prompt, classes, "axis-speed")
        return None if i < 0 else classes[i]

    assert label("a red circle moves up-left fast") == "diagonal fast"
    assert label("a blue square moves left slowly") == "horizontal slow"
    assert label("a green triangle moves down fast") == "vertical fast"
    # two objects on one axis at one speed share the class, whichever way each goes
    assert label("a blue square moves left fast and a green square moves right fast") == "horizontal fast"
    assert label("a blue square moves left fast and a green square moves down fast") is None
    assert label("a blue square moves left fast and a green square moves left slowly") is None
    assert label("a red circle moves left") is None  # no speed asked
    with pytest.raises(ValueError, match="target='sign'"):
        prompt_label("a red circle moves left", classes, "sign")


def test_a_list_of_guidances_adds_their_shifts():
    torch.manual_seed(0)
    dit = randomize(WanDiT(preset("tiny")), seed=3).eval()
    x, _, ctx = tiny_inputs(dit, batch=2, frames=4)
    null = torch.zeros_like(ctx)
    first, windows = _classifier(frames=3, seed=1), _window_classifier([0, 1], frames=3)
    a = MotionGuidance(first, torch.tensor([0, 5]), scale=100.0, sigma_min=0.3)
    b = MotionGuidance(windows, torch.tensor([2, -1]), scale=100.0, sigma_min=0.3)
    steps = dict(num_steps=6, shift=3.0, guidance=2.0)
    only_a, _ = sample_euler(dit, x, ctx, null, **steps, motion_guidance=a)
    listed, _ = sample_euler(
        dit, x, ctx, null, **steps, motion_guidance=[a, MotionGuidance(windows, b.labels, 0.0)]
    )
    torch.testing.assert_close(listed, only_a, rtol=0, atol=0)  # a zero-scale guidance adds nothing
    both, _ = sample_euler(dit, x, ctx, null, **steps, motion_guidance=[a, b])
    assert not torch.allclose(both[0], only_a[0])  # the second guidance steers the sample it labels
    torch.testing.assert_close(both[1], only_a[1], rtol=0, atol=0)  # and leaves its unguided one alone
    # one step by hand: the velocity shifts at the same state add
    one, _ = sample_euler(dit, x, ctx, null, num_steps=1, shift=3.0, guidance=2.0, motion_guidance=[a, b])
    plain, _ = sample_euler(dit, x, ctx, null, num_steps=1, shift=3.0, guidance=2.0)
    torch.testing.assert_close(one - plain, -(a.velocity_shift(x, 1.0) + b.velocity_shift(x, 1.0)))


def test_a_discriminator_guides_every_prompt_toward_real():
    cfg = MotionClassifierConfig(target="realness")
    assert cfg.classes == ["real", "generated"]
    for prompt in (
        "a red circle moves up-left fast",
        "a blue square moves left fast and a green square moves down",
    ):
        assert prompt_label(prompt, cfg.classes, "realness") == 0
    assert prompt_label("a red circle moves left", ["generated", "real"], "realness") == 1
    with pytest.raises(ValueError, match="unknown word 'sideways'"):
        prompt_label("a red circle moves sideways", cfg.classes, "realness")


def test_a_caption_aware_discriminator_guides_toward_real_clips_of_the_asked_direction():
    cfg = MotionClassifierConfig(target="realness-direction")
    assert len(cfg.classes) == 16 and cfg.classes[:2] == ["real up", "real down"]
    assert cfg.classes.index("generated up-left") == 8 + cfg.classes.index("real up-left")
    assert (
        cfg.classes[prompt_label("a red circle moves up-left fast", cfg.classes, cfg.target)]
        == "real up-left"
    )
    both = "a blue square moves left fast and a green circle moves left"
    assert cfg.classes[prompt_label(both, cfg.classes, cfg.target)] == "real left"
    assert prompt_label("a blue square moves left and a green circle moves up", cfg.classes, cfg.target) == -1
    assert prompt_label("a red circle moves fast", cfg.classes, cfg.target) == -1  # no direction: unguided
    pair = MotionClassifierConfig(target="realness-direction", classes=["generated left", "real left"])
    assert prompt_label("a red circle moves left", pair.classes, pair.target) == 1
    # a side without its other side cannot be trained: sampled clips of "left" need a "generated left"
    with pytest.raises(ValueError, match="need their 'generated left' class"):
        MotionClassifierConfig(target="realness-direction", classes=["real left", "real up", "generated up"])
    with pytest.raises(ValueError, match="need their 'real up' class"):
        MotionClassifierConfig(
            target="realness-direction", classes=["generated up", "real left", "generated left"]
        )


def test_wider_latents_are_read_by_their_leading_channels():
    """A codec grown from the classifier's (16 channels from 8) is read by the channels it had: the logits
    are those of the leading channels alone, and guidance leaves the others untouched."""
    clf = _classifier()
    x = torch.randn(2, 4, 5, 4, 6)
    wide = torch.cat([x, 5 * torch.randn(2, 3, 5, 4, 6)], dim=1)
    torch.testing.assert_close(clf(wide, torch.tensor(0.5)), clf(x, torch.tensor(0.5)), rtol=0, atol=0)
    guide = MotionGuidance(clf, torch.tensor([3, 1]), scale=2.0, sigma_min=0.5)
    shift = guide.velocity_shift(wide, 0.8)
    assert shift[:, 4:].abs().max() == 0  # the new channels
    torch.testing.assert_close(shift[:, :4], guide.velocity_shift(x, 0.8))
    assert shift[:, :4].abs().max() > 0
