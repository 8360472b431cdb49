"""Widen a Wan VAE, its decoder or its latent, and a DiT to a widened latent, without changing what they
compute.

`widen_decoder`: a decoder of `decoder_base_dim = D` has D * m channels where one of `base_dim` * m had
them. `widen_latent`: more latent channels (z_dim), the old ones first. Either way the wider model is built
so that at step 0 it is the same function: every old weight is copied to the old channels' places. In a
widened decoder every weight that *produces* a new channel is zero (so new channels hold exactly zero) and
every weight that *reads* one keeps the layer's random init (so the loss has a gradient into the new
channels from the first step). A widened latent does the mirror image: its new channels are random
features of the encoder (the weights that produce them keep their init) and every weight that reads them
starts at zero, so they carry information from step 0 and the decoder learns to use it. Three places need
more than a copy:

- channel groups: the attention's `to_qkv` holds [q | k | v], an `upsample3d` resample's `time_conv` holds
  [frame 0 | frame 1], and the encoder's `conv_out` and `quant_conv` hold [mean | log-variance]; each group
  is widened on its own;
- RMS norms scale by sqrt(channels): the old gammas are scaled by sqrt(old / new) so that zero new channels
  leave every old output as it was;
- the attention is one head of width C, scaled by 1 / sqrt(C): its query rows are scaled by sqrt(new / old).

A widened decoder keeps the encoder, the quant convs and the latent statistics as they are, so every latent
(and every model trained on them) stays valid. A widened latent keeps the old channels' values and
statistics; the new channels get statistics 0 and 1 until they are measured.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from diagvid.model.dit import WanDiT
from diagvid.model.vae import VAEConfig, WanVAE

# parameters whose channels are several blocks of the layer's width: (output blocks, input blocks)
_GROUPS = {"to_qkv": (3, 1), "time_conv": (2, 1), "encoder.conv_out": (2, 1), "quant_conv": (2, 2)}


def _groups(name: str) -> tuple[int, int]:
    return next((g for key, g in _GROUPS.items() if f".{key}." in f".{name}"), (1, 1))


def _embed(old: int, new: int, groups: int) -> torch.Tensor:
    """Indices in a dimension of size `new` where the `old` channels go, `groups` equal blocks each side."""
    if old % groups or new % groups or new < old:
        raise ValueError(f"cannot widen {old} channels in {groups} groups to {new}")
    c_old, c_new = old // groups, new // groups
    i = torch.arange(old)
    return (i // c_old) * c_new + i % c_old


def _widen_tensor(name: str, old: torch.Tensor, init: torch.Tensor, new_start_at_zero: bool) -> torch.Tensor:
    """`old` placed inside a tensor shaped like `init` (see the module docstring for the rules).

    `new_start_at_zero`: the weights that produce a new channel are zero and those that read one keep their
    init; otherwise the other way round (new channels start as random features, nothing reads them yet).
    """
    if old.shape == init.shape:
        return old.clone()
    if old.ndim != init.ndim:
        raise ValueError(f"{name}: shapes {tuple(old.shape)} and {tuple(init.shape)} differ in rank")
    out = init.clone()
    out_groups, in_groups = _groups(name)
    rows = _embed(old.shape[0], init.shape[0], out_groups)
    is_gamma = name.endswith("gamma")
    if not is_gamma and new_start_at_zero:
        new_rows = torch.ones(init.shape[0], dtype=torch.bool)
        new_rows[rows] = False
        out[new_rows] = 0  # a new channel starts at exactly zero
    if old.ndim >= 2 and old.shape[1] != init.shape[1]:
        cols = _embed(old.shape[1], init.shape[1], in_groups)
        if not new_start_at_zero:
            out[rows] = 0  # an old channel does not read the new ones (yet)
        out[rows.view(-1, 1), cols.view(1, -1)] = old
    else:
        out[rows] = old
    if is_gamma:  # an RMS norm over more channels scales by a larger sqrt(C)
        out[rows] *= math.sqrt(old.shape[0] / init.shape[0])
    if name.endswith(("to_qkv.weight", "to_qkv.bias")):  # one attention head, scaled by 1/sqrt(width)
        c_old, c_new = old.shape[0] // 3, init.shape[0] // 3
        out[:c_old] *= math.sqrt(c_new / c_old)
    return out


def _widened(vae: WanVAE, cfg: VAEConfig, seed: int, new_start_at_zero: bool) -> WanVAE:
    """A VAE of `cfg` (wider than vae.cfg somewhere) holding `vae`'s weights by the rules above."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = WanVAE(cfg)
    old_sd = vae.model.state_dict()
    new_sd = wide.model.state_dict()
    if set(old_sd) != set(new_sd):
        raise ValueError(f"widening changed the parameter names: {sorted(set(old_sd) ^ set(new_sd))[:4]}")
    with torch.no_grad():
        wide.model.load_state_dict(
            {
                k: _widen_tensor(k, old_sd[k].float(), v.float(), new_start_at_zero).to(v.dtype)
                for k, v in new_sd.items()
            }
        )
    return wide.to(vae.device, vae.dtype).train(vae.training)


def widen_decoder(vae: WanVAE, decoder_base_dim: int, seed: int = 0) -> WanVAE:
    """A copy of `vae` whose decoder has `decoder_base_dim` channels at full resolution and decodes the same
    video from the same latents (to float rounding). `seed` draws the weights that read the new channels."""
    old_dim = vae.cfg.decoder_base_dim or vae.cfg.base_dim
    if decoder_base_dim < old_dim:
        raise ValueError(f"decoder_base_dim={decoder_base_dim} is narrower than this decoder's {old_dim}")
    return _widened(vae, replace(vae.cfg, decoder_base_dim=decoder_base_dim), seed, new_start_at_zero=True)


def widen_latent(vae: WanVAE, z_dim: int, seed: int = 0) -> WanVAE:
    """A copy of `vae` with `z_dim` latent channels: the old ones first, with their values and statistics;
    the new ones random features of the encoder's last block (statistics 0 and 1 until measured), which
    nothing reads yet, so it decodes every video as `vae` does (to float rounding). (Started at zero
    instead, the new channels grew to 1 % of the old ones' spread in 500 steps at lr 1e-4 and added little.)"""
    if z_dim < vae.cfg.z_dim:
        raise ValueError(f"z_dim={z_dim} is fewer latent channels than this VAE's {vae.cfg.z_dim}")
    extra = z_dim - vae.cfg.z_dim
    cfg = replace(
        vae.cfg,
        z_dim=z_dim,
        latents_mean=[*vae.cfg.latents_mean, *[0.0] * extra],
        latents_std=[*vae.cfg.latents_std, *[1.0] * extra],
    )
    return _widened(vae, cfg, seed, new_start_at_zero=False)


@torch.no_grad()
def widen_dit_latent(dit: WanDiT, channels: int) -> WanDiT:
    """A copy of `dit` that reads and predicts `channels` latent channels, the old ones first (a DiT for a
    codec widened by `widen_latent`). The new channels' patch-embedding columns start at zero, so the tokens,
    and the velocity of the old channels, are the old model's whatever the new channels hold; the new
    channels' output rows start at zero (velocity 0, like Wan's zero-initialised head). Fine-tuning then
    teaches it the new channels from the shipped model instead of from scratch."""
    cfg = dit.cfg
    if cfg.in_dim != cfg.out_dim or channels < cfg.in_dim:
        raise ValueError(
            f"channels={channels}: widening needs as many or more than this DiT's {cfg.in_dim}, and a DiT that "
            f"predicts the channels it reads (in_dim={cfg.in_dim}, out_dim={cfg.out_dim})"
        )
    wide = WanDiT(replace(cfg, in_dim=channels, out_dim=channels))
    old_sd, new_sd = dit.state_dict(), wide.state_dict()
    patch = math.prod(cfg.patch_size)
    state = {}
    for name, init in new_sd.items():
        old = old_sd[name]
        if old.shape == init.shape:
            state[name] = old.clone()
            continue
        out = torch.zeros_like(init)
        if name.startswith(("patch_embedding.", "motion_stem.")):  # [D, C, ...]: new input columns
            out[:, : cfg.in_dim] = old
        else:  # head.head: [P * C (, D)], channels last within each patch position
            rows = _embed(old.shape[0], init.shape[0], patch)
            out[rows] = old
        state[name] = out
    wide.load_state_dict(state)
    return wide.to(next(dit.parameters()).device).train(dit.training)
