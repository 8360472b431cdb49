"""Which of several finished samples moves the way its caption asks: an image-to-video expert as the judge.

The toy text-to-video teacher learns which line an object moves along but not which way along it, while an
image-to-video expert, given where the clip starts, does (docs/status.md, "Where the sign is learned"). So
an image-to-video expert can judge a finished text-to-video sample: given the sample's first latent frame,
how much better does the caption predict the frames after it than the same caption with every direction
word reversed? That is a flow-matching loss, the quantity a diffusion model's likelihood bound is made of,
so the judge is the world's model of motion and not a metric: it never saw a sampler's clip.

`DirectionVerifier.score` rates N candidates of one prompt; `diagvid.sampling.sample_euler_best_of` with
`select_sigma=0` samples them to the end and keeps the best.

Shape letters: N candidates, C latent channels, F latent frames, h, w latent height and width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diagvid.sampling import NUM_TRAIN_TIMESTEPS, FlowMatch, with_first_frame
from diagvid.world.captions import reversed_caption


@dataclass
class DirectionVerifier:
    """Rates how well finished samples move the way their prompt asks, by an image-to-video model's loss.

    For each candidate and noise level in `sigmas`, the model (trained with `clean_first_frame`, so it reads
    latent frame 0 clean at timestep 0) predicts the velocity of latent frames 1 .. `frames` - 1 from the
    candidate noised to that level, once under the prompt and once under its reversed caption, averaged
    over `draws` noises. The score is the sum over levels of log(loss reversed / loss asked): above 0 where
    the prompt explains the candidate's motion better than its reverse. Every candidate gets the same
    noises (seeded by `seed`), so the scores differ only by the candidates. `frames` = 5 (17 video frames)
    is what `configs/toy/teacher-i2v-high.toml` trains on: a caption's direction holds until the first
    bounce, so the first frames carry it.
    """

    model: nn.Module
    text_encoder: object
    sigmas: Sequence[float] = (0.9, 0.8, 0.7, 0.6)
    draws: int = 4
    frames: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sigmas or any(not 0 < s <= 1 for s in self.sigmas):
            raise ValueError(f"sigmas={tuple(self.sigmas)}: at least one noise level, each in (0, 1]")
        if self.draws < 1:
            raise ValueError(f"draws={self.draws}: must be >= 1")
        if self.frames < 2:
            raise ValueError(f"frames={self.frames}: the first latent frame is given, so at least 2")

    @staticmethod
    def judges(prompt: str) -> bool:
        """Whether the prompt asks for a direction (otherwise every candidate would score 0)."""
        return reversed_caption(prompt) != prompt

    @torch.no_grad()
    def score(self, x0: torch.Tensor, prompt: str) -> torch.Tensor:
        """Scores [N] of the finished candidates x0 [N, C, F, h, w] of one prompt; higher is better.

        Candidates with more latent channels than the judge reads (C > its `in_dim`) are judged by their first
        `in_dim`: a codec grown from the judge's (`toy/vae-z16` from `toy/vae`) keeps those channels' meaning.
        """
        if x0.dim() != 5 or x0.shape[2] < 2:
            raise ValueError(f"candidates must be latents [N, C, F >= 2, h, w]; got {list(x0.shape)}")
        if not self.judges(prompt):
            raise ValueError(f"prompt {prompt!r} asks for no direction: nothing to verify")
        channels = self.model.cfg.in_dim  # latents of a codec grown from the judge's: its leading channels
        if x0.shape[1] < channels:
            raise ValueError(f"candidates have {x0.shape[1]} latent channels; the judge reads {channels}")
        n, dev = x0.shape[0], x0.device
        x0 = x0[:, :channels, : self.frames].float()
        ctx = self.text_encoder.encode([prompt, reversed_caption(prompt)])[0].to(dev)
        ctx = ctx.repeat_interleave(n, dim=0)  # [2N, L, D]: the prompt's N rows, then the reverse's
        fm = FlowMatch(shift=1.0, sigma_mode="exact")
        gen = torch.Generator().manual_seed(self.seed)
        loss = torch.zeros(len(self.sigmas), 2, n)
        for _ in range(self.draws):
            noise = torch.randn(1, *x0.shape[1:], generator=gen).to(dev).expand_as(x0)
            target = fm.velocity_target(x0, noise)[:, :, 1:]
            for k, sigma in enumerate(self.sigmas):
                t = torch.full((n,), NUM_TRAIN_TIMESTEPS * float(sigma), device=dev)
                x_t, tt = with_first_frame(fm.add_noise(x0, noise, t), t, x0[:, :, :1])
                v = self.model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), ctx)[:, :, 1:]
                err = (v.float() - torch.cat([target, target])).pow(2).mean(dim=(1, 2, 3, 4))
                loss[k] += err.view(2, n).cpu() / self.draws
        return (loss[:, 1] / loss[:, 0]).log().sum(0)
