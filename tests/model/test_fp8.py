"""FP8 transformer blocks (`diagvid.model.fp8`): the rounding, the product against a float64 reference of
the same rounded operands, what is replaced and what is not, the cached chunk loop, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diagvid.model.fp8 import E4M3, FP8Linear, check_fp8_device, quantize_fp8, to_e4m3_rowwise
from tests.conftest import tiny_inputs

K = 2  # latent frames per chunk


def test_rowwise_rounding_keeps_each_row_to_e4m3_precision():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different size
    x[5] = 0.0
    values, scale = to_e4m3_rowwise(x)
    assert values.dtype == E4M3 and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = values.float() * scale
    amax = x.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(back.abs().amax(dim=1, keepdim=True), amax, rtol=1e-6)  # the row's top is exact
    # 3 mantissa bits: within half a step, 2^-4 of the value, or of the smallest normal step for tiny values
    step = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-9)
    assert ((back - x).abs() <= step + 1e-12).all()
    assert (back - x).abs().max() > 0  # it really rounds
    assert torch.equal(back[5], torch.zeros(96)) and scale[5].item() == 1.0  # a zero row stays zero


@torch.no_grad()
def test_fp8_linear_is_the_product_of_the_rounded_operands():
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 48)
    nn.init.normal_(linear.weight, generator=gen)
    nn.init.normal_(linear.bias, generator=gen)
    x = torch.randn(3, 5, 64, generator=gen)
    y = FP8Linear(linear)(x)
    # reference: dequantised operands, multiplied in float64 (no float8 kernel involved)
    xv, xs = to_e4m3_rowwise(x.reshape(-1, 64))
    wv, ws = to_e4m3_rowwise(linear.weight)
    ref = (xv.double() * xs.double()) @ (wv.double() * ws.double()).t() + linear.bias.double()
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    assert torch.allclose(y.reshape(-1, 48).double(), ref, atol=1e-4, rtol=1e-5)
    exact = linear(x)
    rel = (y - exact).norm() / exact.norm()
    assert 1e-3 < rel < 0.08, rel  # fp8's cost: a few percent, not nothing and not garbage


@torch.no_grad()
def test_a_dtype_cast_after_quantizing_keeps_the_float8_weight_and_its_scales():
    layer = FP8Linear(nn.Linear(32, 48))
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    before = layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == E4M3 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16  # the bias follows the model's precision
    assert torch.allclose(layer(x), before, atol=1e-2)  # only the bias was rounded
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
def test_quantize_replaces_the_block_linears_only_and_stays_close(tiny_dit):
    reference = copy.deepcopy(tiny_dit)
    in_blocks = sum(isinstance(m, nn.Linear) for m in tiny_dit.blocks.modules())
    outside = [
        n for n, m in tiny_dit.named_modules() if isinstance(m, nn.Linear) and not n.startswith("blocks.")
    ]
    assert quantize_fp8(tiny_dit) == in_blocks > 0
    assert not any(isinstance(m, nn.Linear) for m in tiny_dit.blocks.modules())
    assert sum(isinstance(m, FP8Linear) for m in tiny_dit.blocks.modules()) == in_blocks
    assert all(isinstance(tiny_dit.get_submodule(n), nn.Linear) for n in outside)  # embeddings, head
    x, t, ctx = tiny_inputs(tiny_dit)
    exact, fp8 = reference(x, t, ctx), tiny_dit(x, t, ctx)
    rel = (fp8 - exact).norm() / exact.norm()
    assert 1e-3 < rel < 0.1, rel
    assert quantize_fp8(tiny_dit) == 0  # a second call finds nothing left to replace


@torch.no_grad()
def test_fp8_cached_chunk_loop_equals_block_causal(tiny_dit):
    """Each token is scaled on its own, so chunking by the cache changes nothing: the streaming equivalence
    holds in fp8 as in full precision."""
    quantize_fp8(tiny_dit)
    x, t, ctx = tiny_inputs(tiny_dit)
    parallel = tiny_dit(x, t, ctx, attention="causal", frames_per_chunk=K)
    cache = tiny_dit.new_cache(batch_size=2, latent_hw=(4, 6), capacity_frames=6)
    outs = [
        tiny_dit(x[:, :, i : i + K], t[:, i : i + K], ctx, cache=cache, start_frame=i) for i in range(0, 6, K)
    ]
    assert (torch.cat(outs, dim=2) - parallel).abs().max() <= 1e-5 * parallel.abs().max()


def test_quantize_refuses_what_fp8_cannot_run(tiny_dit, monkeypatch):
    odd = copy.deepcopy(tiny_dit)
    odd.blocks[0].ffn[0] = nn.Linear(32, 40)
    with pytest.raises(ValueError, match=r"blocks.0.ffn.0 is 32 -> 40; fp8 needs both multiples of 16"):
        quantize_fp8(odd)
    assert isinstance(odd.blocks[0].self_attn.q, nn.Linear)  # refused before any layer changed
    with pytest.raises(ValueError, match="Sequential has no transformer blocks"):
        quantize_fp8(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(ValueError, match="fp8 runs on a CPU or a CUDA device; device is meta"):
        check_fp8_device("meta")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9 .*NVIDIA A100 has 8.0"):
        check_fp8_device("cuda")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs CUDA sm89+"
)
@torch.no_grad()
def test_fp8_on_gpu_matches_the_cpu_product(tiny_dit):
    reference = copy.deepcopy(tiny_dit)
    quantize_fp8(tiny_dit)
    x, t, ctx = tiny_inputs(tiny_dit)
    on_cpu = tiny_dit(x, t, ctx)
    gpu = copy.deepcopy(reference).cuda().to(torch.bfloat16)
    quantize_fp8(gpu)
    on_gpu = gpu(x.cuda().bfloat16(), t.cuda(), ctx.cuda().bfloat16()).float().cpu()
    assert (on_gpu - on_cpu).norm() / on_cpu.norm() < 0.05
