"""Widening a VAE's decoder or latent: the same function at step 0, gradients into every new channel."""

from __future__ import annotations

import pytest
import torch

from diagvid.model.vae import WanVAE, preset
from diagvid.model.widen import widen_decoder, widen_latent


def trained_looking(decoder_norms: bool) -> WanVAE:
    """A tiny VAE whose norm gammas and biases are not at their init values (ones and zeros), so that a gamma
    or bias put in the wrong place, or a missing rescale, changes the output."""
    torch.manual_seed(0)
    vae = WanVAE(preset("tiny", decoder_norms=decoder_norms, latents_mean=[0.2, -0.1, 0.0, 0.3]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.model.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return vae.eval()


def latents(frames: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 4, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder_norms", [True, False])
@pytest.mark.parametrize("width", [16, 12])  # twice the tiny preset's 8, and a width that is not a multiple
@torch.no_grad()
def test_widened_decoder_decodes_exactly_as_before(decoder_norms, width):
    vae = trained_looking(decoder_norms)
    wide = widen_decoder(vae, width)
    assert wide.cfg.decoder_base_dim == width and wide.model.decoder.conv_out.in_channels == width
    assert wide.model.decoder.conv_in.out_channels == 2 * width  # the deepest level, dim_mult[-1] = 2
    # the encoder side is copied as it is: same latents, same statistics
    old, new = vae.model.state_dict(), wide.model.state_dict()
    assert all(torch.equal(new[k], v) for k, v in old.items() if not k.startswith("decoder."))
    assert wide.cfg.latents_mean == vae.cfg.latents_mean
    z = latents()
    whole = vae.decode(z)
    torch.testing.assert_close(wide.decode(z), whole, atol=2e-5, rtol=0)
    # chunk by chunk through the causal caches too (upsample3d's time_conv holds two frames' channels)
    stream = wide.stream_decoder()
    parts = torch.cat(
        [stream.decode(z[:, :, :1]), stream.decode(z[:, :, 1:3]), stream.decode(z[:, :, 3:])], 2
    )
    torch.testing.assert_close(parts, whole, atol=2e-5, rtol=0)


def test_every_new_channel_gets_a_gradient():
    """New channels start at zero, so the weights that make them must still be reached by the loss."""
    vae = trained_looking(decoder_norms=True)
    wide = widen_decoder(vae, 16).train()
    loss = (wide.decode(latents(3)) - 0.5).square().mean()
    loss.backward()
    old = dict(vae.model.decoder.named_parameters())
    checked = 0
    for name, p in wide.model.decoder.named_parameters():
        if p.shape[0] == old[name].shape[0] or name.endswith("gamma"):
            continue  # an output not widened; a norm's gamma over a zero channel has no gradient at step 0
        g = 3 if ".to_qkv." in name else 2 if ".time_conv." in name else 1  # blocks of channels
        c_old, c_new = old[name].shape[0] // g, p.shape[0] // g
        grown = (torch.arange(p.shape[0]) % c_new) >= c_old  # each block's tail is new
        assert p.detach()[grown].abs().max() == 0, f"{name}: a new channel does not start at zero"
        assert p.grad[grown].abs().sum() > 0, f"{name}: no gradient reaches its new channels"
        checked += 1
    assert checked > 10


def test_widening_seed_and_bad_widths():
    vae = trained_looking(decoder_norms=False)
    a, b, c = widen_decoder(vae, 16, seed=0), widen_decoder(vae, 16, seed=0), widen_decoder(vae, 16, seed=1)
    weight = "decoder.conv_out.weight"
    assert torch.equal(a.model.state_dict()[weight], b.model.state_dict()[weight])
    assert not torch.equal(a.model.state_dict()[weight], c.model.state_dict()[weight])
    same = widen_decoder(vae, 8)  # no wider: a copy
    assert all(torch.equal(same.model.state_dict()[k], v) for k, v in vae.model.state_dict().items())
    with pytest.raises(ValueError, match="decoder_base_dim=4 is narrower than this decoder's 8"):
        widen_decoder(vae, 4)
    with pytest.raises(ValueError, match="decoder_base_dim=0 must be >= 1"):
        preset("tiny", decoder_base_dim=0)


def test_widened_vae_saves_and_loads(tmp_path):
    wide = widen_decoder(trained_looking(decoder_norms=False), 12)
    wide.save(tmp_path / "w")
    loaded = WanVAE.load(tmp_path / "w")
    assert loaded.cfg == wide.cfg and loaded.cfg.decoder_base_dim == 12
    z = latents(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), wide.decode(z), atol=0, rtol=0)


@pytest.mark.parametrize("decoder_norms", [True, False])
@torch.no_grad()
def test_widened_latent_keeps_the_old_channels_and_decodes_as_before(decoder_norms):
    vae = trained_looking(decoder_norms)
    wide = widen_latent(vae, 6)
    assert wide.z_dim == 6 and wide.cfg.latents_mean == [*vae.cfg.latents_mean, 0.0, 0.0]
    assert wide.cfg.latents_std == [*vae.cfg.latents_std, 1.0, 1.0]
    x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z_old, z_new = vae.encode(x), wide.encode(x)
    torch.testing.assert_close(z_new[:, :4], z_old, atol=1e-6, rtol=0)  # mean and log-variance kept apart
    assert z_new[:, 4:].std() > 0.01  # random features of the encoder, which nothing reads yet
    whole = vae.decode(z_old)
    torch.testing.assert_close(wide.decode(z_new), whole, atol=2e-5, rtol=0)
    stream = wide.stream_decoder()
    parts = torch.cat([stream.decode(z_new[:, :, :1]), stream.decode(z_new[:, :, 1:])], dim=2)
    torch.testing.assert_close(parts, whole, atol=2e-5, rtol=0)
    # the posterior's log-variance of the old channels is kept too (the second half of quant_conv's output)
    old_var = vae.model.encode(x).latent_dist.var
    torch.testing.assert_close(wide.model.encode(x).latent_dist.var[:, :4], old_var, atol=1e-5, rtol=1e-5)


def test_the_decoder_learns_to_read_the_new_latent_channels():
    wide = widen_latent(trained_looking(decoder_norms=False), 6).train()
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    (wide.decode(wide.encode(x)) - x).square().mean().backward()
    reads = wide.model.decoder.conv_in.weight  # [out, 6 latent channels, 3, 3, 3]
    assert reads[:, 4:].abs().max() == 0 and reads.grad[:, 4:].abs().sum() > 0
    with pytest.raises(ValueError, match="z_dim=3 is fewer latent channels than this VAE's 6"):
        widen_latent(wide, 3)


def test_a_dit_widened_to_more_latent_channels_keeps_the_old_ones_velocity(tiny_dit):
    """Whatever the new channels hold, the old channels' velocity is the old model's; the new ones start at
    0 (Wan's zero head), and both the new input columns and the new output rows get a gradient."""
    from diagvid.model.widen import widen_dit_latent
    from tests.conftest import tiny_inputs

    wide = widen_dit_latent(tiny_dit, 6)
    assert wide.cfg.in_dim == wide.cfg.out_dim == 6
    x, t, ctx = tiny_inputs(tiny_dit)
    extra = torch.randn(x.shape[0], 2, *x.shape[2:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        old = tiny_dit(x, t, ctx)
        new = wide(torch.cat([x, extra], dim=1), t, ctx)
    torch.testing.assert_close(new[:, :4], old, atol=1e-5, rtol=1e-5)
    assert new[:, 4:].abs().max() == 0
    wide.train()
    (wide(torch.cat([x, extra], dim=1), t, ctx)[:, 4:] - 1).square().mean().backward()  # new channels only
    head = wide.head.head.weight.grad.view(4, 6, -1)  # patch positions (1 x 2 x 2) x channels, channels last
    assert head[:, 4:].abs().sum() > 0 and head[:, :4].abs().sum() == 0
    wide.zero_grad()
    (wide(torch.cat([x, extra], dim=1), t, ctx) - 1).square().mean().backward()  # every channel
    assert wide.patch_embedding.weight.grad[:, 4:].abs().sum() > 0  # the model learns to read the new ones
    with pytest.raises(ValueError, match="channels=3: widening needs as many or more than this DiT's 4"):
        widen_dit_latent(tiny_dit, 3)
