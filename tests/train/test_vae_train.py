"""VAE training: it learns on world clips and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from diagvid.config import from_dict
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.vae import VAETrainConfig, train_vae


def recipe(out) -> VAETrainConfig:
    return from_dict(
        VAETrainConfig,
        {
            "preset": "tiny",
            "steps": 3,
            "batch_size": 1,
            "clip_frames": 5,
            "crop": 16,
            "size": 32,
            "eval_clips": 2,
            "out_dir": str(out),
            "log_every": 1,
            "ckpt_every": 1,
        },
    )


@pytest.fixture(scope="module")
def shipped_dir(tmp_path_factory):
    """A tiny codec trained 3 steps and saved: the `init_from` of the fine-tuning tests (never written to)."""
    root = tmp_path_factory.mktemp("shipped")
    train_vae(recipe(root / "run"), progress=False).save(root / "codec")
    return root / "codec"


def test_resume_is_bit_identical_and_statistics_are_filled(tmp_path):
    def decaying(out):  # the rate falls linearly over the last 2 of 3 steps to half, across the restart too
        cfg = recipe(out)
        cfg.warmup, cfg.decay_steps, cfg.final_lr_ratio = 1, 2, 0.5
        return cfg

    straight = train_vae(decaying(tmp_path / "a"), progress=False)
    train_vae(decaying(tmp_path / "b"), max_steps=1, progress=False)
    resumed = train_vae(decaying(tmp_path / "b"), progress=False)
    a = load_checkpoint(tmp_path / "a/checkpoint.pt")["state"]["vae"]
    b = load_checkpoint(tmp_path / "b/checkpoint.pt")["state"]["vae"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if "lr" in r] == pytest.approx([1e-3, 7.5e-4, 5e-4])
    assert straight.cfg.latents_std == resumed.cfg.latents_std
    assert straight.cfg.latents_std != [1.0] * 4  # measured, not the placeholder


def test_warm_up_streams_the_cache_then_trains_on_the_rest(tmp_path):
    """The warmed reconstruction is exactly the tail of a whole-clip reconstruction (same causal caches),
    and a run with warm-up trains and resumes."""
    from diagvid.model.vae import WanVAE, preset
    from diagvid.train.vae import _reconstruct_after_warmup

    torch.manual_seed(0)
    vae = WanVAE(preset("tiny")).eval()
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    mask = torch.ones(1, 1, 17, 16, 16)
    with torch.no_grad():
        whole = vae.decode(vae.encode(x))
        for warm, cut in ((0, 0), (1, 1), (3, 9)):
            rec, target, m, _ = _reconstruct_after_warmup(vae, x, mask, warm)
            assert target.shape[2] == 17 - cut == rec.shape[2] and m.shape[2] == 17 - cut
            torch.testing.assert_close(rec, whole[:, :, cut:], atol=1e-5, rtol=1e-4)

    cfg = recipe(tmp_path / "w")
    cfg.warm_chunks_max, cfg.eval_frames = 3, 9
    train_vae(cfg, progress=False)
    assert load_checkpoint(tmp_path / "w/checkpoint.pt")["step"] == 3


def test_init_from_starts_from_the_given_weights(tmp_path, shipped_dir):
    from diagvid.model.vae import WanVAE

    cfg = recipe(tmp_path / "b")
    cfg.init_from, cfg.lr, cfg.steps = str(shipped_dir), 0.0, 1
    train_vae(cfg, progress=False)
    started = load_checkpoint(tmp_path / "b/checkpoint.pt")["state"]["vae"]
    for name, tensor in WanVAE.load(shipped_dir).model.state_dict().items():
        assert torch.equal(started[f"model.{name}"], tensor), name


def test_freeze_encoder_trains_the_decoder_alone_and_keeps_the_latents(tmp_path, shipped_dir):
    """A decoder fine-tune leaves every latent unchanged: encoder weights, statistics and the latent-cache key
    (so a teacher trained on the old codec stays valid), while the decoder moves."""
    from diagvid.model.vae import WanVAE
    from diagvid.train.teacher import vae_fingerprint

    cfg = recipe(tmp_path / "b")
    cfg.init_from, cfg.freeze_encoder, cfg.lr, cfg.warmup = str(shipped_dir), True, 1e-2, 1
    tuned = train_vae(cfg, progress=False)
    shipped = WanVAE.load(shipped_dir)
    new, old = tuned.model.state_dict(), shipped.model.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(new[k], old[k]) for k in frozen)
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("decoder."))
    assert (
        tuned.cfg.latents_mean == shipped.cfg.latents_mean
        and tuned.cfg.latents_std == shipped.cfg.latents_std
    )
    assert vae_fingerprint(tuned) == vae_fingerprint(shipped)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tuned.encode(x), shipped.encode(x))

    with pytest.raises(ValueError, match="freeze_encoder=true needs init_from"):
        recipe(tmp_path / "c").__class__(freeze_encoder=True)


def test_first_chunk_share_sets_how_often_a_step_starts_at_frame_zero():
    from diagvid.train.vae import warm_chunks

    def share(**kw) -> float:
        cfg = VAETrainConfig(warm_chunks_max=8, **kw)
        draws = [warm_chunks(cfg, step) for step in range(2000)]
        assert set(draws) <= set(range(9))
        return draws.count(0) / len(draws)

    assert abs(share() - 1 / 9) < 0.03  # the default: uniform over 0..8, unchanged
    assert abs(share(first_chunk_share=0.4) - 0.4) < 0.04
    assert share(first_chunk_share=1.0) == 1.0
    with pytest.raises(ValueError, match=r"first_chunk_share=1\.5"):
        VAETrainConfig(first_chunk_share=1.5)


def test_add_latent_noise_is_one_level_a_clip_in_the_dits_units():
    from diagvid.train.vae import add_latent_noise

    z = torch.zeros(2, 3, 4, 32, 32)
    scale = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1, 1)  # raw = normalised * per-channel std
    noisy = add_latent_noise(z, torch.tensor([0.0, 0.4]), scale, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[0], z[0])  # std 0: that clip is untouched
    measured = noisy[1].std(dim=(1, 2, 3))
    torch.testing.assert_close(measured, 0.4 * scale.flatten(), rtol=0.05, atol=0)


@pytest.mark.parametrize("warm_chunks_max", [0, 2])
def test_latent_noise_reaches_the_decoder_and_resumes_exactly(tmp_path, shipped_dir, warm_chunks_max):

    def tune(out, noise, max_steps=None):
        cfg = recipe(out)
        cfg.init_from, cfg.freeze_encoder, cfg.latent_noise = str(shipped_dir), True, noise
        cfg.warm_chunks_max, cfg.eval_frames = warm_chunks_max, 9
        train_vae(cfg, max_steps=max_steps, progress=False)
        return load_checkpoint(out / "checkpoint.pt")["state"]["vae"]

    noisy = tune(tmp_path / "n", 0.5)
    tune(tmp_path / "r", 0.5, max_steps=1)
    resumed = tune(tmp_path / "r", 0.5)
    assert all(torch.equal(noisy[k], resumed[k]) for k in noisy)
    clean = tune(tmp_path / "c", 0.0)
    assert any(not torch.equal(noisy[k], clean[k]) for k in noisy if k.startswith("model.decoder."))


def test_latent_noise_needs_a_frozen_or_anchored_encoder():
    with pytest.raises(ValueError, match=r"latent_noise=0\.3 must be >= 0, and > 0 only with freeze_encoder"):
        VAETrainConfig(latent_noise=0.3)
    with pytest.raises(ValueError, match=r"latent_noise=-0\.1"):
        VAETrainConfig(latent_noise=-0.1, freeze_encoder=True, init_from="x")
    VAETrainConfig(latent_noise=0.3, latent_anchor=1.0, init_from="x")  # anchored: init_from's units


def test_latent_anchor_is_checked():
    for bad in (dict(latent_anchor=1.0), dict(latent_anchor=1.0, init_from="x", freeze_encoder=True)):
        with pytest.raises(ValueError, match=r"latent_anchor=1\.0 must be >= 0, and > 0 only with init_from"):
            VAETrainConfig(**bad)
    with pytest.raises(ValueError, match=r"latent_anchor=-1\.0"):
        VAETrainConfig(latent_anchor=-1.0, init_from="x")


def test_anchor_latents_are_the_frozen_codecs_on_the_trained_frames():
    """The anchor is the frozen codec's streamed latents after the warm-up: the tail of its whole-clip
    latents, and `latent_drift` compares in its units whatever the trained codec's statistics."""
    from diagvid.model.vae import WanVAE, preset
    from diagvid.train.vae import _anchor_latents, latent_drift

    torch.manual_seed(0)
    frozen = WanVAE(preset("tiny")).eval()
    frozen.latents_mean.normal_()
    frozen.latents_std.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = frozen.encode(x)
        for warm in (0, 1, 3):
            torch.testing.assert_close(
                _anchor_latents(frozen, x, warm), whole[:, :, warm:], atol=1e-5, rtol=1e-4
            )
        same = WanVAE(preset("tiny")).eval()  # the same weights, raw statistics (0 and 1), as in training
        same.model.load_state_dict(frozen.model.state_dict())
        raw = same.encode(x)
        assert latent_drift(raw, same, whole, frozen).item() < 1e-10
        expected = ((0.1 / frozen.latents_std) ** 2).expand_as(whole).mean()
        torch.testing.assert_close(latent_drift(raw + 0.1, same, whole, frozen), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("warm_chunks_max", [0, 2])
def test_latent_anchor_holds_the_trained_encoder_near_its_start(tmp_path, shipped_dir, warm_chunks_max):
    """With the anchor the encoder still trains, its drift is logged, the exported codec keeps init_from's
    statistics, and a strong anchor keeps its latents nearer the start than no anchor does."""
    from diagvid.model.vae import WanVAE
    from diagvid.train.vae import latent_drift

    shipped = WanVAE.load(shipped_dir)

    def tune(out, anchor):
        cfg = recipe(out)
        cfg.init_from, cfg.latent_anchor = str(shipped_dir), anchor
        cfg.lr, cfg.warmup, cfg.steps = 3e-3, 1, 8
        cfg.warm_chunks_max, cfg.eval_frames, cfg.ema_decay = warm_chunks_max, 9, 0.0
        return train_vae(cfg, progress=False)

    anchored, free = tune(tmp_path / "n", 100.0), tune(tmp_path / "f", 0.0)
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        start = shipped.encode(x)
        drift = {
            name: latent_drift(v.encode(x), v, start, shipped).item()
            for name, v in (("n", anchored), ("f", free))
        }
    assert 0 < drift["n"] < drift["f"]
    assert (
        anchored.cfg.latents_std == shipped.cfg.latents_std
        and free.cfg.latents_std != shipped.cfg.latents_std
    )
    log = (tmp_path / "n" / "log.jsonl").read_text()
    assert '"drift"' in log


@pytest.mark.parametrize("px", [1, 2, 3])
def test_outline_band_is_every_pixel_within_px_of_an_outline(px):
    """Against a brute-force reference: a pixel is in the band when its (2 px + 1)-square neighbourhood
    holds both object and background pixels of the same frame (pixels past the border do not count)."""
    from diagvid.train.vae import outline_band

    gen = torch.Generator().manual_seed(px)
    mask = torch.zeros(2, 1, 3, 20, 24, dtype=torch.bool)
    for b in range(2):
        for t in range(3):
            y, x, hgt, wid = (int(v) for v in torch.randint(0, 12, (4,), generator=gen))
            mask[b, 0, t, y : y + 2 + hgt, x : x + 3 + wid] = True  # a rectangle, possibly cut by the border
    mask[1, 0, 2] = False  # a frame with no object has no band
    band = outline_band(mask, px)
    ref = torch.zeros_like(mask)
    for b, t, i, j in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, 20, 24))).tolist():
        hood = mask[b, 0, t, max(0, i - px) : i + px + 1, max(0, j - px) : j + px + 1]
        ref[b, 0, t, i, j] = bool(hood.any() and not hood.all())
    assert band.dtype == torch.bool and torch.equal(band, ref)
    assert band.any() and not band[1, 0, 2].any()


def test_outline_psnr_scores_the_band_alone():
    """A reconstruction wrong by 0.2 on the band alone scores 20 dB there and more over the whole frame."""
    from diagvid.train.vae import outline_band, reconstruction_scores

    clips = torch.zeros(1, 3, 1, 16, 16)
    masks = torch.zeros(1, 1, 1, 16, 16, dtype=torch.bool)
    masks[..., 5:11, 5:11] = True
    clips[masks.expand_as(clips)] = 0.5
    rec = clips.clone()
    band = outline_band(masks, 2).expand_as(clips)
    rec[band] += 0.2  # error 0.2 on the band: PSNR 10 log10(4 / 0.04) = 20 dB there
    scores = reconstruction_scores(rec, clips, masks)
    assert scores["outline_psnr"] == pytest.approx(20.0, abs=1e-3)
    assert scores["psnr"] > scores["outline_psnr"] + 3  # the band is under half the frame


def test_decay_steps_are_checked():
    with pytest.raises(ValueError, match=r"decay_steps=4 must be in \[0, steps=3\]"):
        from_dict(VAETrainConfig, {"steps": 3, "decay_steps": 4})
    with pytest.raises(ValueError, match=r"final_lr_ratio=1\.5 must be in \[0, 1\]"):
        from_dict(VAETrainConfig, {"final_lr_ratio": 1.5})


def test_edge_weight_is_checked():
    with pytest.raises(ValueError, match=r"edge_weight=-1\.0 must be >= 0 and edge_px=2"):
        VAETrainConfig(edge_weight=-1.0)
    with pytest.raises(ValueError, match=r"edge_px=0"):
        VAETrainConfig(edge_weight=5.0, edge_px=0)


def test_edge_weight_reaches_the_loss_on_the_band(tmp_path, monkeypatch):
    import diagvid.train.vae as vae_train

    seen = []
    real = vae_train.reconstruction_loss
    monkeypatch.setattr(vae_train, "reconstruction_loss", lambda rec, x, w: seen.append(w) or real(rec, x, w))
    cfg = recipe(tmp_path)
    cfg.steps, cfg.edge_weight, cfg.fg_weight, cfg.crop = 1, 5.0, 10.0, cfg.size
    train_vae(cfg, progress=False)
    _, mask = vae_train.world_batch(cfg.seed, 0, cfg.batch_size, cfg.clip_frames, cfg.size, cfg.crop)
    band = vae_train.outline_band(mask, 2)
    assert band.sum() > 10  # the crop holds an outline, so the test can tell
    expected = 1.0 + 10.0 * mask + 5.0 * band
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_decoder_loss_weights_objects_and_their_outlines():
    from diagvid.train.vae import decoder_loss, outline_band, reconstruction_loss, world_batch

    x, mask = world_batch(0, 3, 2, 5, 32)
    rec = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert outline_band(mask, 1).sum() > 10
    weight = 1.0 + 4.0 * mask + 3.0 * outline_band(mask, 1)
    assert torch.equal(decoder_loss(rec, x, mask, 4.0, 3.0, 1), reconstruction_loss(rec, x, weight))
    assert torch.equal(decoder_loss(rec, x, mask, 4.0), reconstruction_loss(rec, x, 1.0 + 4.0 * mask))
    assert not torch.allclose(decoder_loss(rec, x, mask, 4.0, 3.0, 1), decoder_loss(rec, x, mask, 4.0))


def test_a_wider_decoder_starts_from_init_froms_widened_decoder(tmp_path, shipped_dir):
    """overrides.decoder_base_dim wider than init_from's: the run starts from init_from's decoder, widened,
    so at step 0 it decodes exactly as init_from does; the encoder and latents stay as they were."""
    from diagvid.model.vae import WanVAE
    from diagvid.train.teacher import vae_fingerprint

    shipped = WanVAE.load(shipped_dir)
    cfg = recipe(tmp_path / "b")
    cfg.init_from, cfg.freeze_encoder, cfg.lr, cfg.steps = str(shipped_dir), True, 0.0, 1
    cfg.overrides = {"decoder_base_dim": 16}
    wide = train_vae(cfg, progress=False).eval()
    assert wide.cfg.decoder_base_dim == 16 and wide.model.decoder.conv_out.in_channels == 16
    assert vae_fingerprint(wide) == vae_fingerprint(shipped)
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # lr 0: still the widened start, the same function as init_from's decoder
        torch.testing.assert_close(wide.decode(z), shipped.decode(z), atol=2e-5, rtol=0)

    cfg = recipe(tmp_path / "c")
    cfg.init_from, cfg.overrides = str(shipped_dir), {"base_dim": 16}
    with pytest.raises(ValueError, match=r"init_from=.* is a VAEConfig\(base_dim=8"):
        train_vae(cfg, progress=False)


def test_more_latent_channels_start_from_init_from_widened_and_anchor_the_old_ones(tmp_path, shipped_dir):
    """overrides.z_dim above init_from's: the run starts from init_from with its latent widened, the anchor
    holds the old channels (the new ones are free), and the export keeps the old channels' statistics and
    measures the new ones'."""
    from diagvid.model.vae import WanVAE
    from diagvid.train.vae import latent_drift

    shipped = WanVAE.load(shipped_dir)

    def widened(out, anchor):
        cfg = recipe(out)
        cfg.init_from, cfg.latent_anchor, cfg.overrides = str(shipped_dir), anchor, {"z_dim": 6}
        cfg.lr, cfg.warmup, cfg.steps, cfg.ema_decay = 3e-3, 1, 4, 0.0
        return train_vae(cfg, progress=False)

    wide, free = widened(tmp_path / "z", 100.0), widened(tmp_path / "f", 0.0)
    assert wide.z_dim == 6
    assert wide.cfg.latents_mean[:4] == shipped.cfg.latents_mean
    assert wide.cfg.latents_std[:4] == shipped.cfg.latents_std
    assert wide.cfg.latents_std[4:] != [1.0, 1.0]  # measured, not the placeholders
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        start = shipped.encode(x)
        assert wide.encode(x)[:, 4:].abs().max() > 0  # the new channels learned something
        drift = [latent_drift(v.encode(x), v, start, shipped).item() for v in (wide, free)]
    assert 0 < drift[0] < drift[1]  # the anchor holds the old channels

    for key, value, word in (
        ("freeze_encoder", True, "freeze_encoder"),
        ("latent_noise", 0.3, "latent_noise"),
    ):
        bad = recipe(tmp_path / key)
        bad.init_from, bad.overrides = str(shipped_dir), {"z_dim": 6}
        bad.latent_anchor = 0.0 if key == "freeze_encoder" else 1.0
        setattr(bad, key, value)
        with pytest.raises(ValueError, match=rf"z_dim=6 differs from init_from's 4.*{word}"):
            train_vae(bad, progress=False)
