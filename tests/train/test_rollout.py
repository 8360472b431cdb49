"""Self-Forcing and Diagonal Forcing rollouts: which forward keeps a graph, which context is written."""

from __future__ import annotations

import pytest
import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.sampling import FlowMatch, get_schedule
from diagvid.train.rollout import context_timesteps, exit_steps, rollout
from tests.conftest import randomize

K = 2


@pytest.fixture
def generator():
    torch.manual_seed(0)
    return randomize(WanDiT(preset("tiny")), seed=4, std=0.2)


def record_calls(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append((float(args[1].flatten()[0]), kwargs["start_frame"], torch.is_grad_enabled()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def run(generator, mode, schedule="diagonal", exit_u=0.3, chunks=4):
    noise = torch.randn(2, 4, chunks * K, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    return rollout(
        generator, FlowMatch(5.0), noise, ctx, get_schedule(schedule), K, mode=mode, exit_u=exit_u, gen=gen
    )


def test_diagonal_forcing_steps_contexts_and_gradients(generator):
    calls, handle = record_calls(generator)
    x = run(generator, "diagonal", exit_u=0.0)
    handle.remove()
    # chunk 0: all 4 steps, grad on the last, clean context; later chunks: exit at step 0, context at t_last
    expect = [
        (1000, 0, False),
        (933, 0, False),
        (833, 0, False),
        (357, 0, True),
        (0, 0, False),
        (1000, 2, True),
        (357, 2, False),
        (1000, 4, True),
        (357, 4, False),
        (1000, 6, True),
        (357, 6, False),
    ]
    assert calls == [(float(t), s, g) for t, s, g in expect]
    x.square().mean().backward()
    assert all(p.grad is not None for p in generator.parameters())


def test_self_forcing_writes_clean_context_every_chunk(generator):
    calls, handle = record_calls(generator)
    with torch.no_grad():
        run(generator, "self-forcing", schedule="self-forcing", exit_u=0.99)
    handle.remove()
    last_per_chunk = [c for c in calls if c[0] == 0.0]
    assert [c[1] for c in last_per_chunk] == [0, 2, 4, 6]
    assert len(calls) == 4 * (4 + 1) and not any(c[2] for c in calls)


def test_exit_draw_is_shared_and_bounded():
    sched = get_schedule("diagonal")
    assert exit_steps(sched, 4, "diagonal", 0.99) == [3, 2, 1, 1]
    assert exit_steps(sched, 4, "diagonal", 0.0) == [3, 0, 0, 0]
    assert exit_steps(get_schedule("self-forcing"), 3, "self-forcing", 0.5) == [2, 2, 2]
    assert context_timesteps(sched, 3, "diagonal") == [0.0, 357.0, 357.0]
    with pytest.raises(ValueError, match=r"exit_u=1\.0"):
        exit_steps(sched, 2, "diagonal", 1.0)
    with pytest.raises(ValueError, match="rollout mode='causvid'"):
        exit_steps(sched, 2, "causvid", 0.5)
