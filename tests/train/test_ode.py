"""ODE pairs from the teacher and the causal student's regression onto them."""

from __future__ import annotations

import pytest
import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.sampling import sample_euler, warp_steps
from diagvid.train.ode import ode_pairs, ode_regression_loss, trajectory_indices
from tests.conftest import randomize

K = 2


def test_causvid_indices():
    # CausVid keeps states 0, 36 and 44 of a 50-step shift-8 trajectory for its [1000, 757, 522] student
    assert trajectory_indices([1000, 757, 522], 50, 8.0) == [0, 36, 44]
    assert trajectory_indices(warp_steps([1000, 750, 500, 250], 8.0), 48, 8.0) == [0, 12, 24, 36]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return randomize(WanDiT(preset("tiny")), seed=5, std=0.2).eval(), randomize(
        WanDiT(preset("tiny")), seed=6, std=0.2
    )


def test_pairs_follow_the_teacher_sampler(models):
    teacher, _ = models
    noise = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx, null = torch.randn(2, 6, 12), torch.zeros(2, 6, 12)
    traj, kept = ode_pairs(teacher, noise, ctx, null, [1000, 700, 400], num_steps=8, shift=3.0, guidance=2.0)
    final, _ = sample_euler(teacher, noise, ctx, null, num_steps=8, shift=3.0, guidance=2.0)
    assert traj.shape == (2, 4, 4, 4, 4, 4)
    assert torch.equal(traj[:, 0], noise) and torch.allclose(traj[:, -1], final)
    assert kept[0] == 1000.0 and kept == sorted(kept, reverse=True)
    with pytest.raises(ValueError, match="need distinct"):
        ode_pairs(teacher, noise, ctx, null, [1000, 999], num_steps=8)


def test_regression_loss_learns_on_noisy_chunks_only(models):
    _, student = models
    traj = torch.randn(2, 3, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 6, 12)
    loss, info = ode_regression_loss(student, traj, [1000.0, 600.0], ctx, K, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss > 0 and info["noisy_chunks"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.blocks[0].parameters())
    # the same generator state picks the same states
    loss2, info2 = ode_regression_loss(
        student, traj, [1000.0, 600.0], ctx, K, torch.Generator().manual_seed(0)
    )
    picks = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(0))
    assert info2["noisy_chunks"] == int((picks < 2).sum()) and torch.allclose(loss, loss2)
    # with only the clean state there is nothing to regress: every chunk is context
    loss3, info3 = ode_regression_loss(student, traj[:, -1:], [], ctx, K, torch.Generator().manual_seed(0))
    assert loss3 == 0 and info3["noisy_chunks"] == 0
