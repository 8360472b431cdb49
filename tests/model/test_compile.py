"""The chunk forward compiles: one graph per call, a bounded number of them over an endless stream.

Runs on CPU with a counting backend (no code generation), so it checks what a GPU run needs from the model
(no graph breaks with `fullgraph=True`, no recompilation per chunk, the same numbers) without a compiler.
"""

from __future__ import annotations

import torch

from diagvid.model.dit import WanDiT, preset
from tests.conftest import randomize


def _stream(model: WanDiT, ctx: torch.Tensor, num_chunks: int) -> list[torch.Tensor]:
    # a rolling window of 3 chunks behind a 1-chunk sink, so the cache fills, then evicts every chunk
    cache = model.new_cache(
        batch_size=1, latent_hw=(4, 4), capacity_frames=8, sink_frames=2, static_shapes=True
    )
    outs = []
    for k in range(num_chunks):
        for t in (1000.0, 500.0):  # two steps: append, then overwrite the same slots
            x = torch.randn(
                1, model.cfg.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(10 * k + int(t))
            )
            with torch.no_grad():
                outs.append(model(x, torch.tensor([t]), ctx, cache=cache, start_frame=2 * k))
    return outs


def _counting(graphs: list):
    """A torch.compile backend that records each graph it is given and runs it as traced (no code)."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_cached_chunk_forward_compiles_to_full_graphs_that_stop_recompiling():
    torch._dynamo.reset()
    model = randomize(WanDiT(preset("tiny"))).eval()
    ctx = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    eager = _stream(model, ctx, num_chunks=8)

    graphs = []

    model.compile_forward(backend=_counting(graphs), fullgraph=True)  # fullgraph: a graph break raises
    before = model.stats.forwards
    compiled = _stream(model, ctx, num_chunks=5)
    after_five = len(graphs)
    compiled += _stream(model, ctx, num_chunks=8)[10:]  # a fresh stream, chunks 5..7 past the first five
    assert model.stats.forwards - before == 2 * (5 + 8)  # the engine's forward count still counts
    assert 1 < after_five <= 8, f"{after_five} graphs for 5 chunks"
    assert len(graphs) == after_five, "chunks after the window filled compiled new graphs"
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch._dynamo.reset()


def test_fp8_blocks_compile_to_full_graphs_with_the_same_numbers():
    """--fp8 with --compile, the GPU run's likely pair: the row-wise rounding and `_scaled_mm` trace with
    no graph break, and the compiled stream equals the eager fp8 one."""
    from diagvid.model.fp8 import quantize_fp8

    torch._dynamo.reset()
    model = randomize(WanDiT(preset("tiny"))).eval()
    quantize_fp8(model)
    ctx = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    eager = _stream(model, ctx, num_chunks=3)
    graphs = []

    model.compile_forward(backend=_counting(graphs), fullgraph=True)
    compiled = _stream(model, ctx, num_chunks=3)
    assert graphs and any("_scaled_mm" in str(gm.graph) for gm in graphs)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch._dynamo.reset()
