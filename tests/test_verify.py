"""The direction verifier: an image-to-video model's loss under a prompt against under its reverse."""

import pytest
import torch

from diagvid.sampling import NUM_TRAIN_TIMESTEPS, with_first_frame
from diagvid.verify import DirectionVerifier
from diagvid.world.captions import OPPOSITE, reversed_caption
from diagvid.world.render import DIRECTIONS


def test_every_direction_reverses_to_its_negated_vector():
    from diagvid.train.teacher import CAPTION_SWAPS

    for word, (dx, dy) in DIRECTIONS.items():
        assert DIRECTIONS[OPPOSITE[word]] == pytest.approx((-dx, -dy))
        assert OPPOSITE[OPPOSITE[word]] == word
    assert CAPTION_SWAPS["direction"] == OPPOSITE  # the loss probes swap the same words
    assert reversed_caption("a red circle moves up-left fast") == "a red circle moves down-right fast"
    # the grammar's two-word directions and two clauses reverse word by word
    assert reversed_caption("a square moves up left and a circle moves down") == (
        "a square moves down right and a circle moves up"
    )
    assert reversed_caption("a blue triangle") == "a blue triangle"


def _independent_score(model, text, x0, prompt, sigmas, draws, frames, seed):
    """The verifier's score written out candidate by candidate and caption by caption."""
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(1, *x0[:, :, :frames].shape[1:], generator=gen) for _ in range(draws)]
    out = []
    for x in x0[:, :, :frames].split(1):
        logs = 0.0
        for sigma in sigmas:
            loss = {}
            for caption in (prompt, reversed_caption(prompt)):
                ctx = text.encode([caption])[0]
                total = 0.0
                for noise in noises:
                    t = torch.full((1,), NUM_TRAIN_TIMESTEPS * sigma)
                    x_t, tt = with_first_frame((1 - sigma) * x + sigma * noise, t, x[:, :, :1])
                    v = model(x_t, tt, ctx)
                    total += (v - (noise - x))[:, :, 1:].pow(2).mean().item()
                loss[caption] = total / draws
            logs += torch.tensor(loss[reversed_caption(prompt)] / loss[prompt]).log().item()
        out.append(logs)
    return torch.tensor(out)


def test_verifier_score_matches_a_candidate_by_candidate_reference(tiny_pipeline):
    model, text = tiny_pipeline.generator.eval(), tiny_pipeline.text_encoder
    x0 = torch.randn(3, model.cfg.in_dim, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    verifier = DirectionVerifier(model, text, sigmas=(0.9, 0.6), draws=2, frames=3, seed=7)
    prompt = "a red circle moves left"
    with torch.no_grad():
        got = verifier.score(x0, prompt)
        want = _independent_score(model, text, x0, prompt, (0.9, 0.6), 2, 3, 7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # every candidate gets the same noises: the order of the candidates does not matter
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(verifier.score(x0[perm], prompt), got[perm], rtol=1e-4, atol=1e-5)


def test_verifier_refuses_bad_settings_and_input(tiny_pipeline):
    model, text = tiny_pipeline.generator, tiny_pipeline.text_encoder
    for kwargs, message in [
        (dict(sigmas=()), r"sigmas=\(\): at least one noise level"),
        (dict(sigmas=(0.9, 0.0)), r"sigmas=\(0\.9, 0\.0\)"),
        (dict(draws=0), "draws=0: must be >= 1"),
        (dict(frames=1), "frames=1: the first latent frame is given, so at least 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            DirectionVerifier(model, text, **kwargs)
    verifier = DirectionVerifier(model, text)
    assert verifier.judges("a red circle moves left") and not verifier.judges("a red circle")
    with pytest.raises(ValueError, match="'a red circle' asks for no direction"):
        verifier.score(torch.zeros(2, model.cfg.in_dim, 3, 4, 4), "a red circle")
    with pytest.raises(ValueError, match=r"latents \[N, C, F >= 2, h, w\]; got \[2, 4, 1, 4, 4\]"):
        verifier.score(torch.zeros(2, model.cfg.in_dim, 1, 4, 4), "a red circle moves left")


def test_verifier_reads_the_leading_channels_of_wider_latents(tiny_pipeline):
    """Candidates from a codec grown from the judge's (more latent channels) are judged by the channels the
    judge reads; fewer channels than it reads are refused by name."""
    model, text = tiny_pipeline.generator.eval(), tiny_pipeline.text_encoder
    c = model.cfg.in_dim
    x0 = torch.randn(2, c, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    wide = torch.cat([x0, 3 * torch.randn(2, c, 4, 4, 4)], dim=1)
    verifier = DirectionVerifier(model, text, sigmas=(0.8,), draws=1, frames=3)
    prompt = "a red circle moves left"
    torch.testing.assert_close(verifier.score(wide, prompt), verifier.score(x0, prompt), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"candidates have {c - 1} latent channels; the judge reads {c}"):
        verifier.score(x0[:, : c - 1], prompt)
