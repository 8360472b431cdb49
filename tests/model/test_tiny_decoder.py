"""The tiny streaming decoder: shapes, chunked == whole decode, causality, files, and its use in pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from diagvid.bench import run_bench
from diagvid.cli import app
from diagvid.config import from_dict
from diagvid.model.tiny_decoder import FastDecodeCodec, TinyDecoder, TinyDecoderConfig, preset
from diagvid.model.vae import WanVAE
from diagvid.model.vae import preset as vae_preset
from diagvid.pretrained import load_pipeline, save_pipeline
from tests.conftest import make_tiny_pipeline


def _decoder(seed: int = 0, name: str = "tiny", **over) -> TinyDecoder:
    torch.manual_seed(seed)
    dec = TinyDecoder(preset(name, **over)).eval()
    with torch.no_grad():  # default init leaves late layers near zero: make every path visible in the output
        for p in dec.parameters():
            p.normal_(0, 0.3)
    return dec


def test_frame_counts_follow_the_wan_vae():
    dec, vae = _decoder(), WanVAE(vae_preset("tiny")).eval()
    z = torch.randn(2, 4, 5, 4, 4)
    with torch.no_grad():
        ours, theirs = dec.decode(z), vae.decode(z)
        stream = dec.stream_decoder()
        first, later = stream.decode(z[:, :, :2]), stream.decode(z[:, :, 2:])
    assert ours.shape == theirs.shape == (2, 3, 17, 16, 16)
    assert first.shape[2] == 1 + 4 * 1 and later.shape[2] == 4 * 3 and stream.latent_frames == 5
    assert ours.abs().max() <= 1.0 and ours.std() > 0.05


@pytest.mark.parametrize("frame_memory", [False, True])
@pytest.mark.parametrize("splits", [(1, 1, 1, 1, 1, 1), (3, 3), (2, 4), (5, 1)])
def test_chunked_decode_equals_the_whole_video(splits, frame_memory):
    dec = _decoder(frame_memory=frame_memory)
    z = torch.randn(2, 4, sum(splits), 4, 4)
    with torch.no_grad():
        whole = dec.decode(z)
        stream, parts, at = dec.stream_decoder(), [], 0
        for k in splits:
            parts.append(stream.decode(z[:, :, at : at + k]))
            at += k
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-6)


def test_decode_is_causal_and_looks_back_only_through_the_memory_blocks():
    dec = _decoder()
    z = torch.randn(1, 4, 6, 4, 4)
    z2 = z.clone()
    z2[:, :, 3] += 1.0
    with torch.no_grad():
        a, b = dec.decode(z), dec.decode(z2)
    changed = (a - b).abs().amax(dim=(0, 1, 3, 4)) > 1e-6  # per pixel frame
    # latent frame j > 0 makes pixel frames 1 + 4(j - 1) .. 4j; frame 3 reaches 2 memory-block frames on
    assert not changed[: 1 + 4 * 2].any()
    assert changed[1 + 4 * 2 : 1 + 4 * 3].all()
    # one memory block in the tiny preset: frame 4 sees frame 3's stem output, frame 5 nothing of it
    assert changed[1 + 4 * 3 : 1 + 4 * 4].any() and not changed[1 + 4 * 4 :].any()
    # a pixel-rate memory reaches one pixel frame further, no more
    dec = _decoder(frame_memory=True)
    with torch.no_grad():
        a, b = dec.decode(z), dec.decode(z2)
    changed = (a - b).abs().amax(dim=(0, 1, 3, 4)) > 1e-6
    assert not changed[: 1 + 4 * 2].any() and changed[1 + 4 * 4] and not changed[1 + 4 * 4 + 1 :].any()


def test_a_new_stream_starts_from_an_empty_memory():
    dec = _decoder()
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        stream = dec.stream_decoder()
        stream.decode(torch.randn(1, 4, 2, 4, 4))
        stream.reset()
        again = stream.decode(z)
    torch.testing.assert_close(again, dec.decode(z), rtol=0, atol=0)


def test_bad_inputs_and_configs_are_refused_with_the_allowed_values():
    dec = _decoder()
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, F, h, w\]"):
        dec.decode(torch.randn(1, 8, 2, 4, 4))
    stream = dec.stream_decoder()
    stream.decode(torch.randn(2, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="chunk batch 1 != 2"):
        stream.decode(torch.randn(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown tiny decoder preset 'big'"):
        preset("big")
    with pytest.raises(ValueError, match="stage_widths"):
        TinyDecoderConfig(stage_widths=[16, 0])
    with pytest.raises(ValueError, match=r"unknown config keys \['decoder.json.depth'\]"):
        from_dict(TinyDecoderConfig, {"z_dim": 4, "depth": 3}, where="decoder.json")
    with pytest.raises(ValueError, match="tiny decoder reads 16 channels at stride 8"):
        FastDecodeCodec(WanVAE(vae_preset("tiny")), TinyDecoder(preset("wan2.1")))


@pytest.mark.parametrize("frame_memory", [False, True])
def test_every_weight_gets_a_gradient(frame_memory):
    dec = TinyDecoder(preset("tiny", frame_memory=frame_memory)).train()
    dec.decode(torch.randn(1, 4, 3, 4, 4)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


def test_save_load_round_trip_is_exact_and_strict(tmp_path):
    dec = _decoder()
    dec.save(tmp_path / "dec")
    back = TinyDecoder.load(tmp_path / "dec")
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(back.decode(z), dec.decode(z))
    weights = load_file(tmp_path / "dec" / "decoder.safetensors")
    weights.pop("to_rgb.bias")
    save_file(weights, tmp_path / "dec" / "decoder.safetensors")
    with pytest.raises(ValueError, match=r"to_rgb\.bias"):
        TinyDecoder.load(tmp_path / "dec")


@pytest.mark.parametrize("frame_memory", [False, True])
def test_channels_last_weights_decode_as_contiguous_ones(frame_memory):
    """The decoder lays its conv weights out channels-last (the fast oneDNN path); the same weights stored
    contiguously (PyTorch's default layout, another conv kernel) decode the same video."""

    def toy_decoder() -> TinyDecoder:
        torch.manual_seed(0)
        dec = TinyDecoder(preset("toy", frame_memory=frame_memory)).eval()
        # this scale keeps the output mostly inside (-1, 1): no clamp hides a difference
        with torch.no_grad():
            for p in dec.parameters():
                p.normal_(0, 0.05)
        return dec

    dec, plain = toy_decoder(), toy_decoder()
    convs = [m for m in dec.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    for p in plain.parameters():
        p.data = p.data.contiguous()
    assert not plain.stem.weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(1, 8, 4, 8, 8)
    with torch.no_grad():
        ours, ref = dec.decode(z), plain.decode(z)
    assert ours.shape == (1, 3, 13, 64, 64) and (ref.abs() < 0.99).float().mean() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_pipeline_decodes_with_its_tiny_decoder(tmp_path):
    """decoder="tiny" swaps only the decode: same latents, same frame count, other pixels; the folder keeps it."""
    pipe = make_tiny_pipeline()
    plain = tmp_path / "plain"
    save_pipeline(pipe, plain)
    with pytest.raises(FileNotFoundError, match="has no tiny-decoder/ folder"):
        load_pipeline(plain, device="cpu", decoder="tiny")
    pipe.vae = FastDecodeCodec(pipe.vae, _decoder())
    fast = tmp_path / "fast"
    save_pipeline(pipe, fast)
    a, runs_a = load_pipeline(fast, device="cpu").generate("a red circle moves left", num_chunks=2, seed=3)
    b, runs_b = load_pipeline(fast, device="cpu", decoder="tiny").generate(
        "a red circle moves left", num_chunks=2, seed=3
    )
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(runs_a, runs_b, strict=True))
    c, _ = load_pipeline(plain, device="cpu", decoder=fast / "tiny-decoder").generate(
        "a red circle moves left", num_chunks=2, seed=3
    )
    assert np.array_equal(b, c)


def test_bf16_tiny_decoder_stays_near_fp32_in_line_and_in_a_worker(tmp_path):
    """decoder_dtype="bf16" decodes the same latents to nearly the same pixels, the worker's exactly as in line;
    a precision for the VAE's own decoder or an unknown one is refused."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker: bf16 kernels may round differently with another thread count
    try:
        _bf16_decodes(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _bf16_decodes(tmp_path) -> None:
    pipe = make_tiny_pipeline()
    pipe.vae = FastDecodeCodec(pipe.vae, _decoder())
    save_pipeline(pipe, tmp_path / "fast")
    kwargs = {"num_chunks": 3, "seed": 3}
    a, runs_a = load_pipeline(tmp_path / "fast", device="cpu", decoder="tiny").generate(
        "a red circle", **kwargs
    )
    half = load_pipeline(tmp_path / "fast", device="cpu", decoder="tiny", decoder_dtype="bf16")
    assert half.vae.decoder.dtype == torch.bfloat16 and half.dtype == torch.float32  # the DiT stays fp32
    b, runs_b = half.generate("a red circle", **kwargs)
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(runs_a, runs_b, strict=True))
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() > 0 and diff.mean() < 1.0  # bf16 rounding, not another picture
    with load_pipeline(
        tmp_path / "fast", device="cpu", decoder="tiny", decoder_dtype="bf16", overlap_decode=True
    ) as overlapped:
        c, _ = overlapped.generate("a red circle", **kwargs)
    np.testing.assert_array_equal(b, c)
    with pytest.raises(ValueError, match="decoder dtype 'bf16' is for a tiny decoder"):
        load_pipeline(tmp_path / "fast", device="cpu", decoder_dtype="bf16")
    assert load_pipeline(tmp_path / "fast", device="cpu", decoder_dtype="fp32").vae is not None  # as it is
    with pytest.raises(ValueError, match="decoder dtype 'int8'; allowed: fp32, fp16, bf16"):
        load_pipeline(tmp_path / "fast", device="cpu", decoder="tiny", decoder_dtype="int8")


def test_a_half_precision_decoder_warns_where_the_cpu_lacks_it(monkeypatch):
    import warnings

    import diagvid.machine
    from diagvid.pretrained import load_tiny_decoder

    monkeypatch.setattr(diagvid.machine, "fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16 convolutions"):
        load_tiny_decoder("toy/tiny-decoder", dtype="bf16")
    with pytest.warns(UserWarning, match="no native fp16 convolutions"):
        load_tiny_decoder("toy/tiny-decoder", dtype="fp16")
    for answer in (True, None):  # AMX or AVX512-BF16, or a machine that cannot tell: no warning
        monkeypatch.setattr(diagvid.machine, "fast_bf16", lambda answer=answer: answer)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_tiny_decoder("toy/tiny-decoder", dtype="bf16").dtype == torch.bfloat16
            load_tiny_decoder("toy/tiny-decoder")


def test_bench_times_the_tiny_decoder_and_says_so():
    report = run_bench("tiny", device="cpu", warmup=False, methods=("diagonal",), decoder="tiny")
    assert report["decoder"] == "tiny" and report["results"][0]["frames"] == 1 + 4 * (4 * 2 - 1)
    assert report["decoder_dtype"] == "float32"
    half = run_bench(
        "tiny", device="cpu", warmup=False, methods=("diagonal",), decoder="tiny", decoder_dtype="bf16"
    )
    assert half["decoder_dtype"] == "bfloat16" and half["results"][0]["frames"] == 1 + 4 * (4 * 2 - 1)
    with pytest.raises(ValueError, match="decoder dtype 'bf16' is for a tiny decoder"):
        run_bench("tiny", device="cpu", decoder_dtype="bf16")
    with pytest.raises(ValueError, match="decoder 'fast'; allowed: vae, tiny"):
        run_bench("tiny", device="cpu", decoder="fast")


def test_generate_cli_with_the_tiny_decoder(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.vae = FastDecodeCodec(pipe.vae, _decoder())
    save_pipeline(pipe, tmp_path / "pipe")
    out = tmp_path / "clip.gif"
    args = ["generate", "--model", str(tmp_path / "pipe"), "-p", "a red circle moves left", "-s", "1"]
    result = CliRunner().invoke(app, [*args, "--decoder", "tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    result = CliRunner().invoke(app, [*args, "--decoder", "tiny", "--decoder-dtype", "bf16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args, "--decoder-dtype", "bf16", "-o", str(out)])
    assert result.exit_code == 2 and "is for a tiny decoder" in result.output.replace("\n", "")
    result = CliRunner().invoke(app, [*args, "--decoder", str(tmp_path / "nowhere"), "-o", str(out)])
    assert result.exit_code == 2 and "nowhere" in result.output.replace("\n", "")


def test_eval_cli_decodes_with_the_tiny_decoder_and_records_it(tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--quick", "--methods", "vae", "--lengths", "1", "--features", "none", "--json", str(out)]
    result = CliRunner().invoke(app, [*args, "--decoder", "tiny", "--decoder-dtype", "bf16"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["decoder"] == "tiny" and report["decoder_dtype"] == "bf16"
    assert report["results"]["vae"]["1x"]["summary"]["colour_accuracy"]["n"] > 0
