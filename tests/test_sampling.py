"""Flow-matching maths and schedule validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from diagvid.sampling import (
    PRESET_SCHEDULES,
    FlowMatch,
    Schedule,
    get_schedule,
    parse_steps,
    teacher_timesteps,
    training_table,
    warp_steps,
)


def test_warp_matches_reference_values():
    assert warp_steps([1000, 750, 500, 250], 5.0) == pytest.approx([1000, 937.5, 833.333, 625], abs=1e-2)
    assert warp_steps([1000, 750, 500, 250], 8.0) == pytest.approx([1000, 960, 888.889, 727.273], abs=1e-2)
    assert warp_steps([100], 5.0) == pytest.approx([357.142857], abs=1e-4)


def test_warp_equals_table_lookup_at_integer_steps():
    table = torch.cat([training_table(5.0) * 1000, torch.zeros(1, dtype=torch.float64)])
    for s in (1000, 757, 522, 100, 1):
        assert warp_steps([s], 5.0)[0] == pytest.approx(float(table[1000 - s]), abs=1e-9)


def test_table_ends():
    table = training_table(5.0)
    assert table[0] == 1.0 and table.shape == (1000,)
    assert float(table[-1] * 1000) == pytest.approx(4.98, abs=0.01)  # the reference's smallest t at shift 5


def test_x0_v_round_trip_and_add_noise():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 5, 5, generator=gen)
    noise = torch.randn(2, 4, 3, 5, 5, generator=gen)
    for mode in ("exact", "nearest"):
        fm = FlowMatch(shift=5.0, sigma_mode=mode)
        t = torch.tensor([[900.0, 900.0, 900.0], [357.0, 357.0, 120.0]])  # per frame
        xt = fm.add_noise(x0, noise, t)
        v = fm.velocity_target(x0, noise)
        assert torch.allclose(fm.x0_from_v(xt, v, t), x0, atol=1e-5) or mode == "nearest"
        assert torch.allclose(fm.x0_from_v(xt, fm.v_from_x0(xt, x0, t), t), x0, atol=1e-5)
    exact = FlowMatch(sigma_mode="exact")
    assert torch.allclose(
        exact.x0_from_v(exact.add_noise(x0, noise, 600.0), noise - x0, 600.0), x0, atol=1e-5
    )


def test_nearest_mode_snaps_like_the_reference():
    fm = FlowMatch(shift=5.0, sigma_mode="nearest")
    assert float(fm.sigma(0.0)) == pytest.approx(0.00498, abs=1e-4)  # t=0 is not clean in the reference
    assert float(fm.sigma(933.0)) == pytest.approx(0.9331, abs=2e-4)
    assert float(FlowMatch(sigma_mode="exact").sigma(0.0)) == 0.0


def test_teacher_timesteps():
    ts = teacher_timesteps(50, 5.0)
    assert len(ts) == 50 and ts[0] == 1000.0 and all(a > b for a, b in itertools.pairwise(ts))


def test_presets_nfe():
    assert PRESET_SCHEDULES["diagonal"].nfe(7) == 18
    assert PRESET_SCHEDULES["self-forcing"].nfe(7) == 35
    assert PRESET_SCHEDULES["causvid"].nfe(7) == 28
    assert PRESET_SCHEDULES["diagonal-5to2"].nfe(7) == 21
    d = PRESET_SCHEDULES["diagonal"]
    assert d.chunk_steps(6) == (1000, 357) and d.chunk_context(0) == "clean" and d.chunk_context(5) == "noisy"


def test_parse_and_custom_schedule():
    assert parse_steps("1000,933,833,357;1000,933,357;1000,357") == (
        (1000, 933, 833, 357),
        (1000, 933, 357),
        (1000, 357),
    )
    s = get_schedule("1000,500;1000,300", context="clean")
    assert s.chunk_steps(9) == (1000, 300) and s.chunk_context(1) == "clean"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1000,933;;1000", "chunk 1"),
        ("1000,abc", "not a list of numbers"),
        ("1000,1000,357", "not strictly decreasing"),
        ("357,1000", "not strictly decreasing"),
        ("1200,500", "outside"),
        ("1000,0", "outside"),
        ("1000,-5", "outside"),
    ],
)
def test_bad_steps_raise(text, message):
    with pytest.raises(ValueError, match=message):
        get_schedule(text)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule 'diagonal-3'; allowed"):
        get_schedule("diagonal-3")  # a misspelt preset is named as such, not parsed as steps
    with pytest.raises(ValueError, match="unknown schedule 'fast'"):
        get_schedule("fast")
    with pytest.raises(ValueError, match="no per-chunk"):
        Schedule("x", (), ("clean",))
    with pytest.raises(ValueError, match="context"):
        get_schedule("diagonal", context="dirty")
    with pytest.raises(ValueError, match="lists 3 chunks but the video has 2"):
        get_schedule("1000,500;1000,400;1000,300").check_fits(2)
    get_schedule("1000,500;1000,400;1000,300").check_fits(3)
    PRESET_SCHEDULES["diagonal"].check_fits(1)  # presets fit any length


def test_euler_sampler_reaches_the_target_of_a_perfect_velocity_field():
    from diagvid.sampling import sample_euler

    target = torch.randn(1, 2, 3, 4, 4)

    def perfect(x, t, ctx):
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        return (x - target) / sigma  # the exact velocity towards one data point

    noise = torch.randn_like(target)
    out, traj = sample_euler(perfect, noise, torch.zeros(1, 1), None, num_steps=8, trajectory_at=(0, 8))
    assert torch.allclose(out, target, atol=1e-5)
    assert torch.equal(traj[0], noise) and torch.equal(traj[8], out)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_first_frame_given_conditions_the_model_and_lands_frame_zero_on_the_given_latent(eta):
    """The wrapped model sees frame 0 clean at timestep 0 and the noisy frames after it at theirs; an Euler or
    ancestral run through it ends with frame 0 on the given latent and the other frames where the model's
    velocity takes them (here, a perfect field towards a target: exactly onto it)."""
    from diagvid.sampling import FirstFrameGiven, sample_euler

    gen = torch.Generator().manual_seed(0)
    target, first = torch.randn(2, 2, 3, 4, 4, generator=gen), torch.randn(1, 2, 1, 4, 4, generator=gen)
    seen = []

    def perfect(x, t, ctx):
        seen.append((x.clone(), t.clone()))
        sigma = (t / 1000).clamp_min(1e-6).view(*t.shape[:2], 1, 1, 1).transpose(1, 2)
        return (x - target) / sigma

    noise = torch.randn(target.shape, generator=gen)
    given = FirstFrameGiven(perfect, first)
    out, _ = sample_euler(given, noise, torch.zeros(2, 1), None, num_steps=6, eta=eta, generator=gen)
    torch.testing.assert_close(out[:, :, :1], first.expand(2, -1, -1, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :, 1:], target[:, :, 1:], atol=1e-5, rtol=0)
    assert len(seen) == 6
    for x, t in seen:
        assert torch.equal(x[:, :, :1], first.expand(2, -1, -1, -1, -1)) and (t[:, 0] == 0).all()
        assert (t[:, 1:] > 0).all() and (t[:, 1:] == t[:, 1:2]).all()
    with pytest.raises(
        ValueError, match=r"first must be one latent frame \[B, C, 1, h, w\]; got \[1, 2, 3, 4, 4\]"
    ):
        FirstFrameGiven(perfect, target[:1])
    with pytest.raises(ValueError, match="image-to-video needs frames after the given one"):
        given(noise[:, :, :1], torch.full((2,), 500.0), torch.zeros(2, 1))


def test_euler_sampler_applies_guidance():
    from diagvid.sampling import sample_euler

    def field(x, t, ctx):  # velocity = the context value, per sample
        return ctx.view(-1, 1, 1, 1, 1).expand_as(x)

    noise = torch.zeros(1, 1, 1, 2, 2)
    cond, null = torch.full((1, 1), 2.0), torch.full((1, 1), 1.0)
    out, _ = sample_euler(field, noise, cond, null, num_steps=4, guidance=3.0)
    # v = 1 + 3 * (2 - 1) = 4 everywhere, integrated over sigma 1 -> 0
    assert torch.allclose(out, torch.full_like(out, -4.0), atol=1e-5)


def test_euler_sampler_can_guide_the_high_noise_steps_with_their_own_scale():
    from diagvid.sampling import sample_euler, teacher_timesteps

    def field(x, t, ctx):  # velocity = the context value, per sample
        return ctx.view(-1, 1, 1, 1, 1).expand_as(x)

    noise = torch.zeros(1, 1, 1, 2, 2)
    cond, null = torch.full((1, 1), 2.0), torch.full((1, 1), 1.0)
    steps = dict(num_steps=6, shift=3.0, guidance=3.0)
    out, _ = sample_euler(field, noise, cond, null, **steps, guidance_above=(0.5, 1.0))
    # v = 2 (the scale-1 velocity, v_c) at levels >= 0.5 and 1 + 3 * (2 - 1) = 4 below: integrate by hand
    ts = [*teacher_timesteps(6, 3.0), 0.0]
    want = sum((b - a) / 1000 * (2.0 if a >= 500 else 4.0) for a, b in itertools.pairwise(ts))
    assert 0 < sum(a >= 500 for a in ts) < 6  # both scales are used
    assert torch.allclose(out, torch.full_like(out, want), atol=1e-5)
    with pytest.raises(ValueError, match=r"guidance_above=\(1.0, 2.0\): its noise level must be in \(0, 1\)"):
        sample_euler(field, noise, cond, null, **steps, guidance_above=(1.0, 2.0))


def test_stochastic_steps_sample_the_forward_process_posterior():
    """eta = 1 draws x at the next level from q(x_next | x, x0): the Gaussian posterior of the flow's
    forward process x = a x_next + b xi (a = (1 - sigma) / (1 - sigma_next), b^2 = sigma^2 - a^2 sigma_next^2),
    worked out by Bayes' rule here rather than by the sampler's snr form."""
    from diagvid.sampling import sample_euler, teacher_timesteps

    torch.manual_seed(0)
    n = 400_000
    x0 = torch.tensor(0.7)

    def towards_x0(x, t, ctx):  # the exact velocity of a model sure that the data is x0
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        return (x - x0) / sigma

    ts = teacher_timesteps(3, 3.0)
    sigma, sigma_next = ts[1] / 1000, ts[2] / 1000
    x = torch.full((1, 1, 1, 1, n), 0.3)
    gen = torch.Generator().manual_seed(1)
    # start at the second level: run the 3-step schedule from there (SDEdit), one stochastic step and the last
    out, traj = sample_euler(
        towards_x0,
        x,
        torch.zeros(1, 1),
        None,
        num_steps=3,
        shift=3.0,
        start_sigma=sigma,
        eta=1.0,
        generator=gen,
        trajectory_at=(1,),
    )
    a = (1 - sigma) / (1 - sigma_next)
    b2 = sigma**2 - a**2 * sigma_next**2
    var = 1 / (1 / sigma_next**2 + a**2 / b2)
    mean = var * ((1 - sigma_next) * x0 / sigma_next**2 + a * 0.3 / b2)
    got = traj[1].flatten()
    assert abs(got.mean().item() - mean) < 5 * (var / n) ** 0.5
    assert got.var().item() == pytest.approx(var, rel=0.01)
    assert torch.allclose(out, x0.expand_as(out), atol=1e-5)  # the last step lands on x0 without noise


def test_stochastic_steps_are_seeded_and_eta_zero_is_the_ode():
    from diagvid.sampling import sample_euler

    def field(x, t, ctx):
        return torch.sin(3 * x) + ctx.view(-1, 1, 1, 1, 1)

    noise = torch.randn(2, 1, 3, 2, 2)
    ctx = torch.tensor([[0.5], [-0.5]])

    def run(eta, seed):
        return sample_euler(
            field, noise, ctx, None, num_steps=6, eta=eta, generator=torch.Generator().manual_seed(seed)
        )[0]

    ode = sample_euler(field, noise, ctx, None, num_steps=6)[0]
    assert torch.equal(run(0.0, 0), ode)
    assert torch.equal(run(0.5, 3), run(0.5, 3))
    assert not torch.allclose(run(0.5, 3), run(0.5, 4))
    assert not torch.allclose(run(0.5, 3), ode)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
            sample_euler(field, noise, ctx, None, num_steps=6, eta=bad)


def _nonlinear_field(x, t, ctx):
    """A velocity that depends on the state, the level and the context, per sample (elementwise: batching
    cannot change its values)."""
    return torch.sin(3 * x) * (t / 1000).view(-1, 1, 1, 1, 1) + ctx.view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_a_run_stopped_at_a_level_and_resumed_from_it_is_the_whole_run(eta):
    from diagvid.sampling import sample_euler

    noise = torch.randn(2, 1, 3, 2, 2)
    ctx = torch.tensor([[0.5], [-0.5]])

    def run(**kw):
        gen = torch.Generator().manual_seed(7)
        return sample_euler(_nonlinear_field, noise, ctx, None, num_steps=9, eta=eta, generator=gen, **kw)

    above = sum(t > 600 for t in teacher_timesteps(9, 5.0))  # the steps above sigma 0.6
    assert 0 < above < 9
    whole, traj = run(trajectory_at=(above,))
    head, _ = run(stop_sigma=0.6)
    torch.testing.assert_close(head, traj[above], rtol=0, atol=0)  # stopped before the first step <= 0.6
    gen = torch.Generator().manual_seed(7)
    steps = dict(num_steps=9, eta=eta, generator=gen)
    head, _ = sample_euler(_nonlinear_field, noise, ctx, None, stop_sigma=0.6, **steps)
    tail, _ = sample_euler(_nonlinear_field, head, ctx, None, start_sigma=0.6, **steps)
    torch.testing.assert_close(tail, whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"stop_sigma=0\.9: must be in \[0, start_sigma=0\.8\)"):
        sample_euler(_nonlinear_field, noise, ctx, None, num_steps=9, start_sigma=0.8, stop_sigma=0.9)
    with pytest.raises(ValueError, match=r"stop_sigma=0\.01 is below the schedule's last step"):
        sample_euler(_nonlinear_field, noise, ctx, None, num_steps=9, stop_sigma=0.01)


def test_best_of_n_keeps_the_start_the_score_prefers_and_one_start_is_the_plain_sampler():
    from diagvid.sampling import sample_euler, sample_euler_best_of

    noise = torch.randn(3, 1, 3, 2, 2)
    ctx, null = torch.tensor([[0.5]]), torch.tensor([[0.1]])
    steps = dict(num_steps=9, guidance=2.0)
    seen = {}

    def prefer_the_largest_mean(x, sigma):
        seen["shape"], seen["sigma"] = tuple(x.shape), sigma
        return x.flatten(1).mean(1)

    out, best = sample_euler_best_of(
        _nonlinear_field, noise, ctx, null, prefer_the_largest_mean, 0.5, **steps
    )
    assert seen == {"shape": (3, 1, 3, 2, 2), "sigma": 0.5}
    # the kept start is the one whose state at sigma 0.5 has the largest mean, and it is finished alone
    head, _ = sample_euler(
        _nonlinear_field, noise, ctx.expand(3, 1), null.expand(3, 1), stop_sigma=0.5, **steps
    )
    assert best == int(head.flatten(1).mean(1).argmax())
    plain, _ = sample_euler(_nonlinear_field, noise[best : best + 1], ctx, null, **steps)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    one, kept = sample_euler_best_of(
        _nonlinear_field, noise[:1], ctx, null, prefer_the_largest_mean, 0.5, **steps
    )
    assert kept == 0
    torch.testing.assert_close(
        one, sample_euler(_nonlinear_field, noise[:1], ctx, null, **steps)[0], rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="one prompt's context"):
        sample_euler_best_of(_nonlinear_field, noise, ctx.expand(3, 1), null, prefer_the_largest_mean, 0.5)
    with pytest.raises(ValueError, match="starts from pure noise"):
        sample_euler_best_of(
            _nonlinear_field, noise, ctx, null, prefer_the_largest_mean, 0.5, start_sigma=0.8
        )


def test_best_of_n_at_sigma_0_judges_finished_samples():
    """select_sigma 0: every start runs to the end and the score picks among the finished samples."""
    from diagvid.sampling import sample_euler, sample_euler_best_of

    noise = torch.randn(3, 1, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    ctx, null = torch.tensor([[0.5]]), torch.tensor([[0.1]])
    steps = dict(num_steps=9, guidance=2.0)
    seen = []

    def prefer_the_smallest_mean(x, sigma):
        seen.append(sigma)
        return -x.flatten(1).mean(1)

    out, best = sample_euler_best_of(
        _nonlinear_field, noise, ctx, null, prefer_the_smallest_mean, 0.0, **steps
    )
    finished, _ = sample_euler(_nonlinear_field, noise, ctx.expand(3, 1), null.expand(3, 1), **steps)
    assert seen == [0.0] and best == int(finished.flatten(1).mean(1).argmin())
    torch.testing.assert_close(out, finished[best : best + 1], rtol=0, atol=0)
    alone, _ = sample_euler(_nonlinear_field, noise[best : best + 1], ctx, null, **steps)
    torch.testing.assert_close(out, alone, rtol=1e-6, atol=1e-6)  # the same as sampling that start alone
    for sigma in (1.0, -0.1):
        with pytest.raises(
            ValueError, match=rf"select_sigma={sigma}: the choice is made at a noise level in \[0, 1\)"
        ):
            sample_euler_best_of(_nonlinear_field, noise, ctx, null, prefer_the_smallest_mean, sigma, **steps)
