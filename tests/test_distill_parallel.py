"""Two gloo ranks compute what one rank computes at the same global batch (DDP and FSDP2 on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from diagvid.config import from_dict
from diagvid.train.checkpoint import load_checkpoint
from diagvid.train.distill import DistillConfig, train_distill
from tests.distill_setup import codecs_and_pairs, distill_recipe, write_toml


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return codecs_and_pairs(tmp_path_factory.mktemp("parallel"), num_samples=4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(out):
    return [
        {k: v for k, v in json.loads(x).items() if k.startswith("loss")}
        for x in (out / "log.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_twice_the_accumulation(root, tmp_path, parallel):
    # global batch 2: one rank with 2 micro-batches of 1, or two ranks with 1 each
    recipe = distill_recipe(
        root, tmp_path / "one", "diagonal", steps=2, global_batch=2, flow_weight=0.5, ckpt_every=2
    )
    recipe["parallel"] = {"device": "cpu", "parallel": parallel}
    one = train_distill(from_dict(DistillConfig, recipe), progress=False)
    config = write_toml({**recipe, "out_dir": str(tmp_path / "two")}, tmp_path / "two.toml")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    try:
        result = subprocess.run(
            [*launch, "-m", "diagvid.cli", "train", "distill", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-rank run timed out; output:\n{err.stdout!s:.3000}\n{err.stderr!s:.3000}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = tmp_path / "two"
    # rank 0 alone wrote the run folder; every step's losses are the global batch's
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "log.jsonl",
        "model.json",
        "train.log",
    ]
    for a, b in zip(losses(one), losses(two), strict=True):
        assert a.keys() == b.keys() and all(
            b[k] == pytest.approx(v, rel=1e-5, abs=1e-7) for k, v in a.items()
        )
    sa, sb = load_checkpoint(one / "checkpoint.pt")["state"], load_checkpoint(two / "checkpoint.pt")["state"]
    for part in ("generator", "critic", "ema"):
        for k, v in sa[part].items():
            torch.testing.assert_close(sb[part][k], v, atol=1e-5, rtol=1e-5, msg=f"{part}.{k}")
