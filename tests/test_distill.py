"""`diagvid train distill`: DMD with each rollout mode, the flow term, resume, recipe errors, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diagvid.cli import app
from diagvid.config import from_dict
from diagvid.model.weights import load_dit
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.distill import DistillConfig, train_distill
from tests.distill_setup import codecs_and_pairs, distill_recipe, init_recipe, ode_recipe, write_toml


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return codecs_and_pairs(tmp_path_factory.mktemp("distill"), num_samples=4)


def run(root, out, rollout="diagonal", max_steps=None, **changes):
    cfg = from_dict(DistillConfig, distill_recipe(root, out, rollout, **changes))
    return train_distill(cfg, max_steps=max_steps, progress=False)


def state(out):
    return load_checkpoint(out / "checkpoint.pt")["state"]


def log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rollout", ["causvid", "self-forcing", "diagonal"])
def test_each_rollout_mode_trains_generator_and_critic(root, tmp_path, rollout):
    out = run(root, tmp_path, rollout)
    start = load_dit(root / "teacher").state_dict()
    got = state(out)
    for part in ("generator", "critic", "ema"):
        assert any(not torch.equal(v, start[k]) for k, v in got[part].items()), f"{part} did not move"
    records = log(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss_dmd"] > 0 and r["grad_norm_generator"] > 0 and r["loss_critic"] > 0 for r in records)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU rms_norm under autocast
def test_bf16_autocast_step(root, tmp_path):
    out = run(root, tmp_path, flow_weight=0.5, steps=1, parallel={"device": "cpu", "precision": "bf16"})
    record = log(out)[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in record.values()) and record["grad_norm_generator"] > 0


def test_flow_term_alone_reaches_the_generator(root):
    from diagvid.sampling import FlowMatch, get_schedule
    from diagvid.train.dmd import DMDSettings, generator_loss
    from diagvid.train.rollout import rollout

    generator, teacher = load_dit(root / "teacher").train(), load_dit(root / "teacher")
    critic = load_dit(root / "teacher")
    with torch.no_grad():  # a critic that differs from the teacher, as after some critic updates
        for p in critic.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    fm, gen = FlowMatch(5.0), torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 4, 4, 4, generator=gen)
    ctx, null = torch.randn(1, 16, 12, generator=gen), torch.zeros(1, 16, 12)
    x = rollout(generator, fm, noise, ctx, get_schedule("diagonal"), 2, mode="diagonal", exit_u=0.5, gen=gen)
    only_flow = DMDSettings(guidance=3.0, shift=5.0, min_t=20, max_t=980, dmd_weight=0.0, flow_weight=1.0)
    loss, metrics = generator_loss(
        x, teacher, critic, fm, ctx, null, only_flow, torch.Generator().manual_seed(2)
    )
    loss.backward()
    assert "loss_dmd" not in metrics and metrics["loss_flow"] > 0
    grads = [p.grad for p in generator.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_flow_weight_changes_the_generator_update(root, tmp_path):
    args = {"steps": 1, "critic_steps": 0}
    off = state(run(root, tmp_path / "off", **args))["generator"]
    on = state(run(root, tmp_path / "on", flow_weight=1.0, **args))["generator"]
    only = run(root, tmp_path / "only", dmd_weight=0.0, flow_weight=1.0, **args)
    assert any(not torch.equal(v, on[k]) for k, v in off.items())
    assert "loss_flow" not in log(tmp_path / "off")[0] and log(only)[0]["grad_norm_generator"] > 0


@pytest.mark.parametrize("rollout", ["diagonal", "causvid"])
def test_resume_is_bit_identical(root, tmp_path, rollout):
    args = {"steps": 3, "ema_start": 1, "ckpt_every": 5}
    straight = run(root, tmp_path / "a", rollout, **args)
    run(root, tmp_path / "b", rollout, max_steps=1, **args)
    assert load_checkpoint(tmp_path / "b/checkpoint.pt")["step"] == 1
    resumed = run(root, tmp_path / "b", rollout, **args)
    a, b = state(straight), state(resumed)
    assert (
        a.keys()
        == b.keys()
        == {
            "generator",
            "critic",
            "ema",
            "generator_opt",
            "generator_sched",
            "critic_opt",
            "critic_sched",
        }
    )
    for part in ("generator", "critic", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    for part in ("generator_opt", "critic_opt"):
        for name, slots in a[part]["state"].items():
            assert all(torch.equal(v, b[part]["state"][name][s]) for s, v in slots.items()), name
    strip = [{k: v for k, v in r.items() if k != "time"} for r in log(straight)]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in log(resumed)]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"rollout": "dmd"}, r"rollout='dmd'; allowed: \('causvid', 'self-forcing', 'diagonal'\)"),
        ({"schedule": "diagonl"}, r"unknown schedule 'diagonl'; allowed:"),
        ({"schedule": "1000,500;1000,400;1000,300"}, "lists 3 chunks but the video has 2"),
        ({"dmd_weight": 0.0}, "dmd_weight=0.0 and flow_weight=0.0 must be >= 0, not both 0"),
        ({"global_batch": 3, "batch_size": 2}, "global_batch=3 must be a positive multiple of batch_size=2"),
        ({"min_t": 990.0}, "min_t=990.0, max_t=980.0"),
        ({"critic_stpes": 2}, r"unknown config keys \['critic_stpes'\]"),
        ({"parallel": {"precision": "fp8"}}, "parallel.precision='fp8'; allowed"),
    ],
)
def test_bad_recipes_are_refused_at_load(root, tmp_path, changes, error):
    with pytest.raises((ValueError, TypeError), match=error):
        from_dict(DistillConfig, distill_recipe(root, tmp_path, **changes))


def test_a_pair_of_noise_experts_is_the_real_score(root, tmp_path):
    from tests.distill_setup import tiny_dit_folder

    def generator_after_one_step(out, **changes):
        run(root, out, "self-forcing", max_steps=1, **changes)
        return state(out)["generator"]

    alone = generator_after_one_step(tmp_path / "alone")
    # the teacher as its own expert routes every level to the same weights: the same run, bit for bit
    same = generator_after_one_step(tmp_path / "same", teacher_high=str(root / "teacher"))
    assert all(torch.equal(v, same[k]) for k, v in alone.items())
    # another expert above 0.5 changes the real score, so the generator's update
    other = tiny_dit_folder(tmp_path / "high", seed=7)
    paired = generator_after_one_step(tmp_path / "pair", teacher_high=str(other), teacher_boundary=0.5)
    assert any(not torch.equal(v, paired[k]) for k, v in alone.items())
    with pytest.raises(ValueError, match=r"teacher_boundary=0\.5 only means something with teacher_high"):
        from_dict(DistillConfig, distill_recipe(root, tmp_path, teacher_boundary=0.5))


def test_bad_shapes_are_refused_before_compute(root, tmp_path):
    with pytest.raises(ValueError, match=r'rollout="causvid" trains on ground truth: set ode_dir'):
        from_dict(DistillConfig, distill_recipe(root, tmp_path, "causvid", ode_dir=None))
    with pytest.raises(ValueError, match=r"latent size \(frames=4, height=5, width=4\)"):
        run(root, tmp_path, latent_hw=[5, 4])
    with pytest.raises(
        ValueError, match=r"ODE pairs in .* are \[C, F, h, w\] = \[4, 4, 4, 4\].*\[4, 6, 4, 4\]"
    ):
        run(root, tmp_path, "causvid", num_chunks=3)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_runs_the_three_stages(root, tmp_path):
    runner = CliRunner()
    ode = write_toml(ode_recipe(root, out_dir=str(tmp_path / "ode"), num_samples=2), tmp_path / "ode.toml")
    init = init_recipe(root, tmp_path / "init", data_dir=str(tmp_path / "ode"), steps=1)
    distill = distill_recipe(root, tmp_path / "distill", "diagonal", generator=str(tmp_path / "student"))
    steps = [
        ["train", "ode", "--config", str(ode)],
        [
            "train",
            "init",
            "--config",
            str(write_toml(init, tmp_path / "init.toml")),
            "--export",
            str(tmp_path / "student"),
        ],
        [
            "train",
            "distill",
            "--config",
            str(write_toml(distill, tmp_path / "distill.toml")),
            "--set",
            "steps=1",
            "--export",
            str(tmp_path / "distilled"),
        ],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert load_dit(tmp_path / "distilled").cfg == load_dit(root / "teacher").cfg
    bad = runner.invoke(
        app, ["train", "distill", "--config", str(tmp_path / "distill.toml"), "--set", "rollout=x"]
    )
    assert bad.exit_code == 2 and "rollout='x'; allowed" in bad.output
