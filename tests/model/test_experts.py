"""NoiseExperts: each sample goes to the expert of its noise level, whatever the batch mixes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diagvid.model.dit import WanDiT, preset
from diagvid.model.experts import NoiseExperts
from diagvid.sampling import sample_euler, teacher_timesteps
from tests.conftest import randomize, tiny_inputs


def _pair() -> tuple[WanDiT, WanDiT]:
    torch.manual_seed(0)
    return randomize(WanDiT(preset("tiny")), seed=1).eval(), randomize(WanDiT(preset("tiny")), seed=2).eval()


@torch.no_grad()
def test_each_sample_is_denoised_by_the_expert_of_its_level():
    high, low = _pair()
    experts = NoiseExperts(high, low, boundary=0.7)
    x, _, ctx = tiny_inputs(low, batch=3, frames=3)
    t = torch.tensor([900.0, 700.0, 699.0])  # the boundary level itself is the high expert's
    got = experts(x, t, ctx)
    for i, model in enumerate((high, high, low)):
        torch.testing.assert_close(got[i : i + 1], model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]))
    assert not torch.allclose(high(x[2:], t[2:], ctx[2:]), got[2:])  # the experts really differ
    # per-frame timesteps: a sample goes by its noisiest frame
    t_frames = torch.tensor([[100.0, 800.0, 100.0], [100.0, 200.0, 300.0], [750.0] * 3])
    got = experts(x, t_frames, ctx)
    for i, model in enumerate((high, low, high)):
        torch.testing.assert_close(got[i : i + 1], model(x[i : i + 1], t_frames[i : i + 1], ctx[i : i + 1]))


@torch.no_grad()
def test_a_sampler_hands_over_at_the_boundary():
    high, low = _pair()
    x, _, ctx = tiny_inputs(low, batch=1, frames=3)
    null = torch.zeros_like(ctx)
    steps = dict(num_steps=6, shift=3.0, guidance=2.0)
    got, _ = sample_euler(NoiseExperts(high, low, 0.5), x, ctx, null, **steps)
    # the same trajectory by hand: the high expert above sigma 0.5, then the low one from where it stopped
    ts = teacher_timesteps(6, 3.0)
    n_high = sum(t >= 500 for t in ts)
    assert 0 < n_high < 6
    _, mid = sample_euler(high, x, ctx, null, **steps, trajectory_at=(n_high,))
    want, _ = sample_euler(low, mid[n_high], ctx, null, **steps, start_sigma=ts[n_high] / 1000)
    torch.testing.assert_close(got, want)


def test_experts_must_share_the_latent_space_and_a_boundary_inside_the_trajectory():
    high, low = _pair()
    with pytest.raises(ValueError, match="the experts disagree on in_dim: high-noise 8, low-noise 4"):
        NoiseExperts(WanDiT(replace(low.cfg, in_dim=8, out_dim=8)), low, 0.7)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"boundary={bad} must be a noise level in \\(0, 1\\)"):
            NoiseExperts(high, low, bad)


def test_load_teacher_builds_one_teacher_or_a_pair(tmp_path):
    from diagvid.model.weights import save_dit
    from diagvid.pretrained import load_teacher

    high, low = _pair()
    save_dit(high, tmp_path / "high")
    save_dit(low, tmp_path / "low")
    alone = load_teacher(tmp_path / "low")
    assert isinstance(alone, WanDiT)
    assert all(
        torch.equal(a, b) for a, b in zip(alone.state_dict().values(), low.state_dict().values(), strict=True)
    )
    pair = load_teacher(tmp_path / "low", tmp_path / "high")
    assert isinstance(pair, NoiseExperts) and pair.boundary == 0.7  # the toy expert's sigma_min
    assert torch.equal(pair.high.blocks[0].ffn[0].weight, high.blocks[0].ffn[0].weight)
    assert torch.equal(pair.low.blocks[0].ffn[0].weight, low.blocks[0].ffn[0].weight)
    assert load_teacher(tmp_path / "low", tmp_path / "high", 0.4).boundary == 0.4
    assert pair.token_grid(3, 4, 4) == low.token_grid(3, 4, 4)
    with pytest.raises(
        ValueError, match=r"teacher boundary 0\.4: only means something with a high-noise expert"
    ):
        load_teacher(tmp_path / "low", None, 0.4)


def test_a_noise_expert_folder_records_its_range_and_load_teacher_warns_outside_it(tmp_path):
    import json
    import warnings

    from diagvid.model.weights import convert, load_dit, read_noise_range, save_dit
    from diagvid.pretrained import load_teacher

    high, low = _pair()
    save_dit(high, tmp_path / "high", noise_range=(0.7, 1.0))
    save_dit(low, tmp_path / "low", noise_range=(0.0, 0.7))
    save_dit(low, tmp_path / "full")
    assert json.loads((tmp_path / "low" / "config.json").read_text())["noise_range"] == [0.0, 0.7]
    assert "noise_range" not in json.loads((tmp_path / "full" / "config.json").read_text())
    assert read_noise_range(tmp_path / "high") == (0.7, 1.0)
    assert read_noise_range(tmp_path / "high" / "model.safetensors") == (0.7, 1.0)
    assert read_noise_range(tmp_path / "full") == (0.0, 1.0)
    # another file in the folder is not the folder's model
    (tmp_path / "high" / "generator.pt").write_bytes(b"")
    assert read_noise_range(tmp_path / "high" / "generator.pt") == (0.0, 1.0)
    # the record is not architecture: the weights load as before
    assert torch.equal(load_dit(tmp_path / "low").blocks[0].ffn[0].weight, low.blocks[0].ffn[0].weight)

    def warned(*args) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            load_teacher(*args)
        return [str(w.message) for w in seen]

    assert warned(tmp_path / "low", tmp_path / "high") == []  # at the toy boundary, 0.7: each in its range
    assert warned(tmp_path / "full") == []
    assert warned(tmp_path / "low", tmp_path / "full", 0.5) == []  # the low expert covers [0, 0.5]
    (alone,) = warned(tmp_path / "low")
    assert "trained at noise levels [0, 0.7] only, but alone it denoises [0, 1]" in alone
    assert "Pair it with an expert" in alone
    (high_side,) = warned(tmp_path / "low", tmp_path / "high", 0.6)
    assert f"{tmp_path / 'high'} was trained at noise levels [0.7, 1] only" in high_side
    assert "as the high-noise expert it denoises [0.6, 1]" in high_side
    (low_side,) = warned(tmp_path / "low", tmp_path / "full", 0.8)
    assert "as the low-noise expert it denoises [0, 0.8]" in low_side

    # conversion keeps the record in our layout and says so when a Wan layout cannot hold it
    convert(tmp_path / "high", tmp_path / "high16", dtype="fp16")
    assert read_noise_range(tmp_path / "high16") == (0.7, 1.0)
    lines = convert(tmp_path / "high", tmp_path / "high-wan", to="wan")
    assert any("noise_range [0.7, 1.0] is not kept" in line for line in lines)
    assert read_noise_range(tmp_path / "high-wan") == (0.0, 1.0)


@pytest.mark.parametrize(
    "bad", [(0.7, 0.7), (0.8, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.5,), "0-0.7", (True, 1.0)]
)
def test_a_bad_noise_range_is_refused_by_name(tmp_path, bad):
    import json

    from diagvid.model.weights import read_noise_range, save_dit

    _, low = _pair()
    with pytest.raises(ValueError, match=r"noise_range=.* must be two noise levels lo < hi in \[0, 1\]"):
        save_dit(low, tmp_path / "low", noise_range=bad)
    save_dit(low, tmp_path / "low")
    raw = json.loads((tmp_path / "low" / "config.json").read_text())
    (tmp_path / "low" / "config.json").write_text(json.dumps({**raw, "noise_range": bad}))
    with pytest.raises(ValueError, match=r"config\.json: noise_range="):
        read_noise_range(tmp_path / "low")


def test_the_wan_layouts_refuse_a_noise_range(tmp_path):
    from diagvid.model.weights import write_weights

    high, _ = _pair()
    with pytest.raises(ValueError, match=r"layout='wan' has no place for noise_range=\(0\.7, 1\.0\)"):
        write_weights(high.state_dict(), high.cfg, tmp_path / "w", layout="wan", noise_range=(0.7, 1.0))
