"""CausVid's initialisation: teacher ODE trajectories, then regression of a block-causal student onto them.

Stage 1 (`ode_pairs`) runs the teacher's sampler (Euler, shift, CFG) and keeps the states at the teacher
steps closest to the student's denoising timesteps, plus the final sample. Stage 2 (`ode_regression_loss`)
picks one of those states per chunk (so chunks sit at different noise levels, as at inference), runs the
student once in block-causal parallel mode and regresses its x0 onto the teacher's final sample. Chunks
given the clean state act as clean context and are left out of the loss.

`write_ode_pairs` is stage 1 as a resumable job (`diagvid train ode`): prompts and noise are a function
of the sample index, samples are grouped into safetensors shards written atomically, a complete shard is
never recomputed, and a manifest describes the folder. `OdeShards` reads it back for the later stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diagvid.config import to_dict
from diagvid.model.dit import WanDiT
from diagvid.model.experts import TOY_BOUNDARY, check_experts
from diagvid.sampling import NUM_TRAIN_TIMESTEPS, FlowMatch, sample_euler, teacher_timesteps
from diagvid.train.loop import progress_bar, seeded

log = logging.getLogger("diagvid.train")

MANIFEST = "manifest.json"
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def trajectory_indices(student_steps: Sequence[float], num_steps: int, shift: float) -> list[int]:
    """Teacher step index whose timestep is nearest each student timestep (CausVid: [0, 36, 44] of 50)."""
    ts = torch.tensor(teacher_timesteps(num_steps, shift))
    return [int((ts - float(t)).abs().argmin()) for t in student_steps]


@torch.no_grad()
def ode_pairs(
    teacher: WanDiT,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    student_steps: Sequence[float],
    *,
    num_steps: int = 50,
    shift: float = 5.0,
    guidance: float = 5.0,
) -> tuple[torch.Tensor, list[float]]:
    """Teacher trajectories [B, S + 1, C, F, h, w] at the student's S steps plus the clean end, and the
    teacher timesteps actually kept (they differ slightly from the requested ones)."""
    idx = trajectory_indices(student_steps, num_steps, shift)
    if sorted(set(idx)) != idx:
        raise ValueError(
            f"student steps {list(student_steps)} map to teacher steps {idx}; need distinct, increasing"
        )
    _, saved = sample_euler(
        teacher,
        noise,
        context,
        null_context,
        num_steps=num_steps,
        shift=shift,
        guidance=guidance,
        trajectory_at=(*idx, num_steps),
    )
    traj = torch.stack([saved[i] for i in (*idx, num_steps)], dim=1)
    kept = [teacher_timesteps(num_steps, shift)[i] for i in idx]
    return traj, kept


def ode_regression_loss(
    student: WanDiT,
    traj: torch.Tensor,
    timesteps: Sequence[float],
    context: torch.Tensor,
    frames_per_chunk: int,
    gen: torch.Generator,
    fm: FlowMatch | None = None,
) -> tuple[torch.Tensor, dict]:
    """MSE between the student's x0 and the teacher's final sample, one trajectory state per chunk.

    traj [B, S + 1, C, F, h, w] from `ode_pairs`; index S is the clean sample (timestep 0).
    """
    fm = fm or FlowMatch(sigma_mode="exact")
    b, s1, _, f = traj.shape[:4]
    if f % frames_per_chunk:
        raise ValueError(f"{f} latent frames do not split into chunks of {frames_per_chunk}")
    chunks = f // frames_per_chunk
    pick = torch.randint(0, s1, (b, chunks), generator=gen)  # same state for every frame of a chunk
    pick_f = pick.repeat_interleave(frames_per_chunk, dim=1)  # [B, F]
    t_all = torch.tensor([*map(float, timesteps), 0.0])
    t = t_all[pick_f].to(traj.device)  # [B, F]
    frame = torch.arange(f)
    x_in = traj[torch.arange(b)[:, None], pick_f, :, frame[None, :]]  # [B, F, C, h, w]
    x_in = x_in.permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
    clean = traj[:, -1]
    v = student(x_in, t, context, attention="causal", frames_per_chunk=frames_per_chunk)
    x0 = fm.x0_from_v(x_in, v, t)
    noisy = (pick_f < s1 - 1).to(x0.dtype)[:, None, :, None, None]  # clean-context frames carry no loss
    err = (x0.float() - clean.float()).square() * noisy
    denom = noisy.expand_as(err).sum().clamp_min(1)
    return err.sum() / denom, {"noisy_chunks": int((pick < s1 - 1).sum())}


# ----- stage 1 as a job: shards of ODE pairs on disk -----------------------------------------------------


@dataclass
class OdeConfig:
    """A run of the teacher's sampler that writes ODE pairs for the student's initialisation."""

    teacher: str = "toy/teacher"
    """bundled name or folder of the bidirectional teacher DiT"""
    teacher_high: str | None = None
    """a high-noise expert that takes the sampler's steps at levels >= teacher_boundary, the teacher the rest
    (Wan2.2's split, `NoiseExperts`): toy/teacher-high with teacher = "toy/teacher-deep" (or "toy/teacher-low"); None: one teacher"""
    teacher_boundary: float | None = None
    """the noise level in (0, 1) where teacher_high hands over (None: the toy expert's 0.7)"""
    text: str = "toy/text"
    """bundled name or folder of the text encoder"""
    out_dir: str = "data/toy-ode"
    """where the shards and manifest.json go (git-ignored)"""
    prompts: str | None = None
    """text file, one prompt a line, cycled; None: toy-world captions drawn from the sample's seed"""
    negative_prompt: str = ""
    """the unconditional prompt of classifier-free guidance"""
    p_two: float = 0.25
    """toy-world captions: probability of a two-object prompt"""
    num_samples: int = 1024
    """ODE pairs in total (raising it later extends the folder, keeping what is there)"""
    shard_size: int = 64
    """samples per shard file: the unit of resumption"""
    batch_size: int = 8
    """samples per teacher forward (does not change the data)"""
    latent_frames: int = 21
    """latent frames F per sample"""
    latent_hw: tuple[int, int] = (8, 8)
    """latent height and width"""
    student_steps: tuple[float, ...] = (1000.0, 933.0, 833.0, 357.0)
    """the student's timesteps: the trajectory is kept at the teacher steps nearest to them"""
    num_steps: int = 50
    """Euler steps of the teacher's sampler"""
    guidance: float = 5.0
    """CFG scale w: v = v_uncond + w (v_cond - v_uncond); 1 turns guidance off"""
    shift: float = 5.0
    """flow shift of the teacher's sampler"""
    store_dtype: str = "float32"
    """precision of the stored trajectories and text embeddings: float32, float16 or bfloat16"""
    seed: int = 0
    """prompts and noise of sample i come from (seed, i)"""
    device: str = "auto"
    """"auto", "cpu" or "cuda" (under torchrun each rank writes every world_size-th shard)"""

    def __post_init__(self) -> None:
        for name in ("num_samples", "shard_size", "batch_size", "latent_frames", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if len(self.latent_hw) != 2 or min(self.latent_hw) < 1:
            raise ValueError(f"latent_hw={self.latent_hw} must be two positive sizes")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype={self.store_dtype!r}; allowed: {sorted(STORE_DTYPES)}")
        if self.shift <= 0 or self.guidance < 0:
            raise ValueError(f"shift={self.shift} must be > 0 and guidance={self.guidance} >= 0")
        if not 0 <= self.p_two <= 1:
            raise ValueError(f"p_two={self.p_two} must be in [0, 1]")
        check_experts(self.teacher_high, self.teacher_boundary)
        steps = list(self.student_steps)
        if not steps or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in steps):
            raise ValueError(f"student_steps={steps} must be non-empty, each in (0, {NUM_TRAIN_TIMESTEPS}]")
        idx = trajectory_indices(steps, self.num_steps, self.shift)
        if sorted(set(idx)) != idx:
            raise ValueError(
                f"student_steps={steps} map to teacher steps {idx} of num_steps={self.num_steps}; they must "
                "be distinct and decreasing (more teacher steps, or student steps further apart)"
            )

    def recipe_hash(self) -> str:
        """Fingerprint of everything that decides the samples (not their number, batching or device)."""
        skip = ("out_dir", "num_samples", "batch_size", "device")
        if self.teacher_high is None:  # one teacher: the fingerprint of the recipes from before the experts
            skip += ("teacher_high", "teacher_boundary")
        fields = {k: v for k, v in to_dict(self).items() if k not in skip}
        if self.teacher_high is not None and self.teacher_boundary is None:
            fields["teacher_boundary"] = TOY_BOUNDARY  # the default and its value are the same recipe
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"shard-{index:05d}.safetensors"


def read_prompts(path: str | None) -> list[str] | None:
    """The prompts of a text file (one a line, blank lines skipped), or None for toy-world captions."""
    if path is None:
        return None
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts")
    return lines


def sample_prompt(seed: int, index: int, p_two: float = 0.25, lines: Sequence[str] | None = None) -> str:
    """Prompt of sample `index`: a line of a prompt file (cycled), or the caption of a toy-world clip whose
    seed is a function of (seed, index)."""
    if lines:
        return lines[index % len(lines)]
    from diagvid.world import TRAIN_SEED_LIMIT, caption, sample_spec

    world_seed = seeded(seed, "prompt", index).initial_seed() % TRAIN_SEED_LIMIT
    return caption(sample_spec(world_seed, num_frames=1, p_two=p_two))


def _shard_is_complete(path: Path, samples: int, recipe: str) -> bool:
    """A shard counts when it opens, was made by this recipe and holds all its samples (else redo it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = f.get_slice("trajectory").get_shape()[0]
    except Exception:  # missing, truncated or foreign: the shard is written again
        return False
    return meta.get("recipe") == recipe and int(meta.get("samples", -1)) == samples == rows


def _check_manifest(out: Path, cfg: OdeConfig) -> None:
    path = out / MANIFEST
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if old.get("recipe") != cfg.recipe_hash():
        raise ValueError(
            f"{out} holds ODE pairs of another recipe (manifest recipe {old.get('recipe')}, this one "
            f"{cfg.recipe_hash()}); choose another out_dir or delete {out}"
        )


def write_ode_pairs(cfg: OdeConfig, *, progress: bool = True) -> Path:
    """Write the ODE-pair shards of `cfg` (skipping complete ones) and the manifest; returns the folder."""
    from diagvid.pretrained import load_teacher, load_text_encoder
    from diagvid.train.checkpoint import save_tensors_atomic, write_text_atomic
    from diagvid.train.distributed import ParallelConfig, setup

    rt = setup(ParallelConfig(device=cfg.device))
    try:
        out = Path(cfg.out_dir)
        # 1. validate everything against the models before any teacher forward
        teacher = load_teacher(cfg.teacher, cfg.teacher_high, cfg.teacher_boundary, device=rt.device)
        teacher.eval().requires_grad_(False)
        text = load_text_encoder(cfg.text, rt.device)
        teacher.token_grid(cfg.latent_frames, *cfg.latent_hw)
        if text.dim != teacher.cfg.text_dim:
            raise ValueError(f"text encoder width {text.dim} != teacher text_dim {teacher.cfg.text_dim}")
        lines = read_prompts(cfg.prompts)
        recipe = cfg.recipe_hash()
        kept = [
            teacher_timesteps(cfg.num_steps, cfg.shift)[i]
            for i in trajectory_indices(cfg.student_steps, cfg.num_steps, cfg.shift)
        ]
        num_shards = -(-cfg.num_samples // cfg.shard_size)
        counts = [min(cfg.shard_size, cfg.num_samples - i * cfg.shard_size) for i in range(num_shards)]
        manifest = {
            "format": "diagvid-ode",
            "complete": False,
            "recipe": recipe,
            "config": to_dict(cfg),
            "timesteps": kept,
            "sample_shape": [len(kept) + 1, teacher.cfg.in_dim, cfg.latent_frames, *cfg.latent_hw],
            "context_shape": [text.text_len, text.dim],
            "num_samples": cfg.num_samples,
            "shards": [{"file": shard_name(i), "samples": n} for i, n in enumerate(counts)],
        }
        if rt.main:
            _check_manifest(out, cfg)
            out.mkdir(parents=True, exist_ok=True)
            old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {}
            if old.get("num_samples") != cfg.num_samples:  # new, or extended: incomplete until the end
                write_text_atomic(json.dumps(manifest, indent=2) + "\n", out / MANIFEST)
        rt.barrier()

        # 2. the shards of this rank that are not complete yet
        mine = range(rt.rank, num_shards, rt.world_size)
        todo = [i for i in mine if not _shard_is_complete(out / shard_name(i), counts[i], recipe)]
        for i in mine:
            for stale in out.glob(f".{shard_name(i)}.*.tmp"):  # a writer killed mid-file
                stale.unlink(missing_ok=True)
        log.info("ODE pairs: %d of %d shards to write in %s", len(todo), len(mine), out)
        bar = progress_bar(progress and rt.main, "ode pairs", sum(counts[i] for i in todo))
        dtype = next(teacher.parameters()).dtype
        shape = tuple(manifest["sample_shape"][1:])
        null = text.encode([cfg.negative_prompt])[0].to(dtype)
        for i in todo:
            lo = i * cfg.shard_size
            trajs, ctxs, caps = [], [], []
            for b0 in range(lo, lo + counts[i], cfg.batch_size):
                idx = range(b0, min(b0 + cfg.batch_size, lo + counts[i]))
                prompts = [sample_prompt(cfg.seed, j, cfg.p_two, lines) for j in idx]
                ctx = text.encode(prompts)[0].to(dtype)
                noise = torch.stack([torch.randn(shape, generator=seeded(cfg.seed, "noise", j)) for j in idx])
                traj, _ = ode_pairs(
                    teacher,
                    noise.to(rt.device, dtype),
                    ctx,
                    null.expand(len(idx), -1, -1),
                    cfg.student_steps,
                    num_steps=cfg.num_steps,
                    shift=cfg.shift,
                    guidance=cfg.guidance,
                )
                trajs.append(traj)
                ctxs.append(ctx)
                caps.extend(prompts)
                if bar is not None:
                    bar[0].update(bar[1], advance=len(idx))
            store = STORE_DTYPES[cfg.store_dtype]
            save_tensors_atomic(
                {
                    "trajectory": torch.cat(trajs).to(store),
                    "context": torch.cat(ctxs).to(store),
                    "timesteps": torch.tensor(kept, dtype=torch.float64),
                },
                out / shard_name(i),
                {"recipe": recipe, "samples": str(counts[i]), "first": str(lo), "captions": json.dumps(caps)},
            )
            log.info("wrote %s (%d samples from %d)", shard_name(i), counts[i], lo)  # for logs without a bar
        if bar is not None:
            bar[0].stop()

        # 3. the manifest says "complete" once every shard of every rank is on disk
        rt.barrier()
        if rt.main:
            write_text_atomic(json.dumps({**manifest, "complete": True}, indent=2) + "\n", out / MANIFEST)
        return out
    finally:
        rt.close()


class OdeShards:
    """A finished ODE-pair folder: sample i -> (trajectory [S + 1, C, F, h, w], text context [T, D])."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {self.folder}; write the pairs with `diagvid train ode`"
            )
        manifest = json.loads(path.read_text())
        if not manifest.get("complete"):
            raise ValueError(
                f"{self.folder} is incomplete; rerun `diagvid train ode` with its recipe to finish it"
            )
        self.timesteps: list[float] = manifest["timesteps"]
        self.sample_shape: tuple[int, ...] = tuple(manifest["sample_shape"])
        self.context_shape: tuple[int, ...] = tuple(manifest["context_shape"])
        self.files = [self.folder / s["file"] for s in manifest["shards"]]
        self.starts = [0]
        for s in manifest["shards"]:
            self.starts.append(self.starts[-1] + s["samples"])

    def __len__(self) -> int:
        return self.starts[-1]

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Trajectories [B, S + 1, C, F, h, w] and contexts [B, T, D] (float32) of these samples."""
        import bisect

        from safetensors import safe_open

        trajs, ctxs = [], []
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"sample {i} outside the {len(self)} ODE pairs in {self.folder}")
            s = bisect.bisect_right(self.starts, i) - 1
            row = i - self.starts[s]
            with safe_open(str(self.files[s]), framework="pt") as f:
                trajs.append(f.get_slice("trajectory")[row : row + 1])
                ctxs.append(f.get_slice("context")[row : row + 1])
        return torch.cat(trajs).float(), torch.cat(ctxs).float()


class Shuffle:
    """Position in an endless stream of epochs -> dataset index; epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("cannot shuffle an empty dataset")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch, self._perm = (
                epoch,
                torch.randperm(self.n, generator=seeded(self.seed, "epoch", epoch)),
            )
        return int(self._perm[position % self.n])
