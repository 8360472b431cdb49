"""Flow-matching maths and per-chunk step schedules, shared by training and streaming.

Rectified flow: x_t = (1 - sigma) x0 + sigma * noise, the network predicts v = noise - x0, so
x0 = x_t - sigma v. Timesteps are t = 1000 sigma. A shift s bends the schedule towards high noise:
sigma' = s sigma / (1 + (s - 1) sigma).

Sigma lookup has two modes:
- "nearest": snap t to the nearest entry of the 1000-entry shifted training table (what the CausVid /
  Self-Forcing / DD code does everywhere; t = 0 then maps to the smallest table sigma, not to 0);
- "exact": sigma = t / 1000 (continuous; t = 0 is really clean).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diagvid.model.motion import MotionGuidance

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MODES = ("exact", "nearest")


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The inverse of `shift_sigma`: the unshifted level whose shifted level is `sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def training_table(shift: float, n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The shifted sigma table of the reference scheduler: n entries from 1 down to about shift/n/(...)."""
    base = 1.0 - torch.arange(n, dtype=torch.float64) / n  # linspace(1, 0, n+1) without the final 0
    return shift_sigma(base, shift)


def warp_steps(steps: Sequence[float], shift: float) -> list[float]:
    """Map config steps written in unshifted units to shifted timesteps: t = 1000 * shift_sigma(step/1000).

    At integer steps this equals the reference's table lookup `T_ext[1000 - step]`.
    """
    for s in steps:
        if not 0 <= s <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"step {s} outside [0, {NUM_TRAIN_TIMESTEPS}]")
    return [float(NUM_TRAIN_TIMESTEPS * shift_sigma(s / NUM_TRAIN_TIMESTEPS, shift)) for s in steps]


class FlowMatch:
    """Noising and conversions at timesteps t in [0, 1000], with exact or nearest-table sigmas."""

    def __init__(self, shift: float = 5.0, sigma_mode: str = "exact") -> None:
        if sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode={sigma_mode!r}; allowed: {SIGMA_MODES}")
        if shift <= 0:
            raise ValueError(f"shift={shift} must be > 0")
        self.shift = shift
        self.sigma_mode = sigma_mode
        self.table = training_table(shift)  # [1000] float64

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma of timesteps t (any shape), float32."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.sigma_mode == "exact":
            return (t / NUM_TRAIN_TIMESTEPS).float()
        grid = self.table.to(t.device) * NUM_TRAIN_TIMESTEPS
        idx = (t.reshape(-1, 1) - grid[None]).abs().argmin(dim=1)
        return self.table.to(t.device)[idx].reshape(t.shape).float()

    def _expand(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # sigma [B] or [B, F] against latents [B, C, F, H, W]
        sigma = sigma.to(like.device)
        if sigma.ndim == 0:
            return sigma.to(like.dtype)
        if sigma.ndim == 1:
            return sigma.view(-1, 1, 1, 1, 1).to(like.dtype)
        return sigma[:, None, :, None, None].to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise; t scalar, [B] or per frame [B, F]."""
        s = self._expand(self.sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Clean-sample estimate x0 = x_t - sigma v."""
        return x_t - self._expand(self.sigma(t), x_t) * v

    def v_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Velocity v = (x_t - x0) / sigma, in float64 as the reference does (sigma may be small)."""
        s = self._expand(self.sigma(t), x_t).double()
        return ((x_t.double() - x0.double()) / s).to(x_t.dtype)

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict: v = noise - x0."""
        return noise - x0


def teacher_timesteps(num_steps: int, shift: float) -> list[float]:
    """The undistilled sampler's timesteps: num_steps shifted sigmas from 1 towards 0, as t = 1000 sigma."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    base = 1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    return [float(NUM_TRAIN_TIMESTEPS * s) for s in shift_sigma(base, shift)]


def _at_or_below(t: float, sigma: float) -> bool:
    """Whether timestep t (0-1000) is at or below noise level sigma, with a tolerance for the float scale."""
    return t <= NUM_TRAIN_TIMESTEPS * sigma + 1e-6


def partial_timesteps(num_steps: int, shift: float, start_sigma: float) -> list[float]:
    """The steps of `teacher_timesteps(num_steps, shift)` at or below t = 1000 `start_sigma` (all of them at 1)."""
    if not (isinstance(start_sigma, int | float) and 0 < start_sigma <= 1):
        raise ValueError(f"start_sigma={start_sigma!r} must be in (0, 1]")
    ts = [t for t in teacher_timesteps(num_steps, shift) if _at_or_below(t, start_sigma)]
    if not ts:
        last = teacher_timesteps(num_steps, shift)[-1] / NUM_TRAIN_TIMESTEPS
        raise ValueError(f"start_sigma={start_sigma} is below the schedule's last step (sigma {last:.4f})")
    return ts


# ----- per-chunk schedules --------------------------------------------------------------------------------

CONTEXT_POLICIES = ("clean", "noisy")


@dataclass(frozen=True)
class Schedule:
    """Per-chunk denoising timesteps and how each chunk's KV context is written; the last entry repeats.

    context "clean": after the chunk's last step, one extra forward at t = `context_t` on the clean output
    writes its K/V (CausVid, Self-Forcing). "noisy": no extra forward; later chunks see the K/V of the
    chunk's last noisy denoising forward (Diagonal Distillation).
    """

    name: str
    steps: tuple[tuple[float, ...], ...]
    context: tuple[str, ...]
    context_t: float = 0.0
    strict: bool = False
    """a user's list: generating fewer chunks than it lists is an error (presets apply to any length)"""

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"schedule {self.name!r} has no per-chunk step lists")
        for i, chunk in enumerate(self.steps):
            if not chunk:
                raise ValueError(f"schedule {self.name!r}: chunk {i} has an empty step list")
            for t in chunk:
                if not 0 < t <= NUM_TRAIN_TIMESTEPS:
                    raise ValueError(
                        f"schedule {self.name!r}: chunk {i} timestep {t} is outside (0, {NUM_TRAIN_TIMESTEPS}]"
                    )
            if any(a <= b for a, b in itertools.pairwise(chunk)):
                raise ValueError(
                    f"schedule {self.name!r}: chunk {i} steps {list(chunk)} are not strictly decreasing"
                )
        if not self.context or any(c not in CONTEXT_POLICIES for c in self.context):
            raise ValueError(
                f"schedule {self.name!r}: context {self.context}; allowed per chunk: {CONTEXT_POLICIES}"
            )
        if not 0 <= self.context_t < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"context_t={self.context_t} must be in [0, {NUM_TRAIN_TIMESTEPS})")

    def chunk_steps(self, k: int) -> tuple[float, ...]:
        """Timesteps of chunk k."""
        return self.steps[min(k, len(self.steps) - 1)]

    def chunk_context(self, k: int) -> str:
        """Context policy of chunk k."""
        return self.context[min(k, len(self.context) - 1)]

    def check_fits(self, num_chunks: int) -> None:
        """For a strict (user) schedule, raise if it lists more chunks than the video has."""
        if not self.strict:
            return
        longest = max(len(self.steps), len(self.context))
        if num_chunks < longest:
            raise ValueError(
                f"schedule {self.name!r} lists {longest} chunks but the video has {num_chunks}; "
                f"generate at least {longest} chunks or shorten the schedule"
            )

    def nfe(self, num_chunks: int) -> int:
        """Transformer forwards this schedule needs for `num_chunks` chunks (the engine counts its own)."""
        return sum(len(self.chunk_steps(k)) + (self.chunk_context(k) == "clean") for k in range(num_chunks))

    def with_context(self, policy: str) -> Schedule:
        """The same steps with one context policy for every chunk."""
        return Schedule(f"{self.name}+{policy}", self.steps, (policy,), self.context_t, self.strict)


def parse_steps(text: str) -> tuple[tuple[float, ...], ...]:
    """Parse "1000,933,833,357;1000,933,357;1000,357" into per-chunk lists (validated by `Schedule`)."""
    lists = []
    for i, part in enumerate(text.split(";")):
        items = [x.strip() for x in part.split(",")]
        if not part.strip() or any(not x for x in items):
            raise ValueError(f"malformed steps {text!r}: chunk {i} ({part!r}) has an empty entry")
        try:
            lists.append(tuple(float(x) for x in items))
        except ValueError as err:
            raise ValueError(
                f"malformed steps {text!r}: chunk {i} ({part!r}) is not a list of numbers"
            ) from err
    return tuple(lists)


def _sf_steps() -> tuple[float, ...]:
    return tuple(warp_steps([1000, 750, 500, 250], shift=5.0))


PRESET_SCHEDULES: dict[str, Schedule] = {
    # Diagonal Distillation: more steps early, 2 later; chunk 0 gets a clean context pass, later chunks keep
    # the K/V of their last noisy forward. 18 forwards for 7 chunks.
    "diagonal": Schedule(
        "diagonal", ((1000, 933, 833, 357), (1000, 933, 357), (1000, 357)), ("clean", "noisy")
    ),
    # the paper figure's 5 -> 4 -> 3 -> 2 denoising steps, same context policy (21 forwards for 7 chunks)
    "diagonal-5to2": Schedule(
        "diagonal-5to2",
        ((*_sf_steps(), 357), (1000, 933, 833, 357), (1000, 933, 357), (1000, 357)),
        ("clean", "noisy"),
    ),
    # Self-Forcing: 4 warped steps (shift 5) and a clean context pass every chunk, 35 forwards for 7 chunks
    "self-forcing": Schedule("self-forcing", (_sf_steps(),), ("clean",)),
    # CausVid: 3 unwarped steps and a clean context pass every chunk, 28 forwards for 7 chunks
    "causvid": Schedule("causvid", ((1000, 757, 522),), ("clean",)),
}


def get_schedule(name_or_steps: str | Schedule, context: str | None = None) -> Schedule:
    """A preset by name, or a per-chunk step string; `context` overrides the policy of every chunk."""
    if isinstance(name_or_steps, Schedule):
        sched = name_or_steps
    elif name_or_steps in PRESET_SCHEDULES:
        sched = PRESET_SCHEDULES[name_or_steps]
    elif name_or_steps.strip()[:1].isdigit():  # a step list starts with a number, a preset with a letter
        # a user list: chunk 0 gets a clean pass like the diagonal preset unless told otherwise
        sched = Schedule("custom", parse_steps(name_or_steps), ("clean", "noisy"), strict=True)
    else:
        raise ValueError(
            f"unknown schedule {name_or_steps!r}; allowed: {sorted(PRESET_SCHEDULES)} or a per-chunk list "
            f"like '1000,933,833,357;1000,933,357;1000,357'"
        )
    if context is not None:
        if context not in CONTEXT_POLICIES:
            raise ValueError(f"context={context!r}; allowed: {CONTEXT_POLICIES}")
        sched = sched.with_context(context)
    return sched


# ----- the undistilled sampler ----------------------------------------------------------------------------


def _stochastic_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One step of `sample_euler` with eta > 0: x0 and eps from v, eps partly refreshed, renoised."""
    x0 = x - sigma * v
    if sigma_next <= 0:
        return x0
    eps = x + (1 - sigma) * v
    snr_ratio = ((1 - sigma) * sigma_next / (sigma * (1 - sigma_next))) ** 2  # snr / snr_next, < 1
    fresh = eta**2 * (1 - snr_ratio)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    eps = (1 - fresh) ** 0.5 * eps + fresh**0.5 * z
    return (1 - sigma_next) * x0 + sigma_next * eps


@torch.no_grad()
def sample_euler(
    model: torch.nn.Module,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    *,
    num_steps: int = 50,
    shift: float = 5.0,
    guidance: float = 5.0,
    trajectory_at: Sequence[int] = (),
    start_sigma: float = 1.0,
    guidance_above: tuple[float, float] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    motion_guidance: MotionGuidance | Sequence[MotionGuidance] | None = None,
    stop_sigma: float = 0.0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's sampler: Euler on the flow ODE over `num_steps` shifted steps, classifier-free guidance.

    `model(x, t, context)` returns velocity; with `null_context` and guidance != 1 the conditional and
    unconditional velocities are batched into one forward: v = v_u + guidance (v_c - v_u). Returns the
    final sample and the states x_t before step i for every i in `trajectory_at` (for ODE pairs; index
    `num_steps` is the final sample).
    `start_sigma` < 1 runs only the schedule's steps from `partial_timesteps(num_steps, shift, start_sigma)[0]`
    on: `noise` must then be a sample at that level (SDEdit); `trajectory_at` counts from there.
    `guidance_above=(sigma, w)` uses the scale w instead at the steps whose noise level is >= sigma, as Wan2.2
    gives its high-noise expert its own scale (`NoiseExperts`; pass the same boundary).
    `eta` > 0 makes each step stochastic, DDIM's eta for the flow: the step predicts x0 and the noise
    eps = x + (1 - sigma) v, then renoises x0 to the next level with eps partly replaced by fresh noise
    from `generator` (CPU): a fraction eta^2 (1 - snr / snr_next) of its variance, snr = ((1 - sigma) /
    sigma)^2. eta = 1 is DDPM's ancestral sampler; eta = 0 is the Euler step above, bit for bit.
    `stop_sigma` > 0 stops before the first step at or below that level and returns the state there, from
    which `start_sigma=stop_sigma` runs the rest: the two runs together are the whole one.
    `motion_guidance`: classifier guidance (`diagvid.model.motion.MotionGuidance`), or a list of them whose
    velocity shifts, each taken at the same state, are summed.
    """
    guides = _guidance_list(motion_guidance)
    if guidance_above is not None and not 0 < guidance_above[0] < 1:
        raise ValueError(f"guidance_above={guidance_above}: its noise level must be in (0, 1)")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta}: must be in [0, 1] (0: the ODE, 1: DDPM's ancestral sampler)")
    if not 0 <= stop_sigma < start_sigma:
        raise ValueError(f"stop_sigma={stop_sigma}: must be in [0, start_sigma={start_sigma})")
    ts = [*partial_timesteps(num_steps, shift, start_sigma), 0.0]
    # the steps a run from start_sigma=stop_sigma would take are left out
    end = next(i for i, t in enumerate(ts) if _at_or_below(t, stop_sigma))
    if stop_sigma > 0 and end == len(ts) - 1:
        raise ValueError(
            f"stop_sigma={stop_sigma} is below the schedule's last step (sigma {ts[-2] / NUM_TRAIN_TIMESTEPS:.4f}): "
            "no step would be left to resume"
        )
    x = noise
    saved = {}
    for i in range(end):
        if i in trajectory_at:
            saved[i] = x.clone()
        t = torch.full((x.shape[0],), ts[i], device=x.device)
        w = guidance
        if guidance_above is not None and ts[i] >= guidance_above[0] * NUM_TRAIN_TIMESTEPS:
            w = guidance_above[1]
        if null_context is not None and w != 1.0:
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_context])).chunk(
                2
            )
            v = v_u + w * (v_c - v_u)
        else:
            v = model(x, t, context)
        for guide in guides:
            if guide.applies(ts[i] / NUM_TRAIN_TIMESTEPS):
                v = v + guide.velocity_shift(x, ts[i] / NUM_TRAIN_TIMESTEPS)
        if eta > 0:
            x = _stochastic_step(
                x, v, ts[i] / NUM_TRAIN_TIMESTEPS, ts[i + 1] / NUM_TRAIN_TIMESTEPS, eta, generator
            )
        else:
            x = x + (ts[i + 1] - ts[i]) / NUM_TRAIN_TIMESTEPS * v  # sigma goes down: dt < 0
    if end in trajectory_at:
        saved[end] = x.clone()
    return x, saved


def _guidance_list(
    motion_guidance: MotionGuidance | Sequence[MotionGuidance] | None,
) -> list[MotionGuidance]:
    if motion_guidance is None:
        return []
    if isinstance(motion_guidance, Sequence):
        return list(motion_guidance)
    return [motion_guidance]


def with_first_frame(
    x_t: torch.Tensor, t: torch.Tensor, first: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image-to-video input: (x_t, per-frame timesteps [B, F]) with latent frame 0 replaced by the clean
    `first` [B, C, 1, h, w] at timestep 0, in the clips where `rows` [B] is set (every clip by default), as
    Wan2.2's TI2V conditions on its first frame. `t` is [B] (one level a clip) or [B, F]."""
    b, f = x_t.shape[0], x_t.shape[2]
    t = (t[:, None].expand(b, f) if t.dim() == 1 else t).clone()
    rows = torch.ones(b, dtype=torch.bool) if rows is None else rows
    rows = rows.to(x_t.device)
    t[rows, 0] = 0.0
    x_t = x_t.clone()
    x_t[rows, :, :1] = first[rows].to(x_t.dtype)
    return x_t, t


class FirstFrameGiven(torch.nn.Module):
    """Image-to-video through any text-to-video sampler: `model` sees latent frame 0 as the clean `first`
    [1 or B, C, 1, h, w] at timestep 0 (how a model trained with `clean_first_frame` is conditioned, as in
    Wan2.2's TI2V), and frame 0's velocity is the one whose clean prediction is `first` (x - sigma v =
    first), so Euler, ancestral and guided steps alike carry frame 0 to `first` while the model denoises the
    frames after it."""

    def __init__(self, model: torch.nn.Module, first: torch.Tensor) -> None:
        super().__init__()
        if first.dim() != 5 or first.shape[2] != 1:
            raise ValueError(f"first must be one latent frame [B, C, 1, h, w]; got {list(first.shape)}")
        self.model, self.first = model, first

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        b, f = x.shape[0], x.shape[2]
        if f < 2:
            raise ValueError(f"image-to-video needs frames after the given one; got {f} latent frame")
        level = t if t.dim() == 1 else t[:, 0]
        sigma = (level / NUM_TRAIN_TIMESTEPS).clamp_min(1e-6).view(b, 1, 1, 1, 1)
        first = self.first.to(x.dtype).expand(b, *self.first.shape[1:])
        v = self.model(*with_first_frame(x, t, first), context, **kwargs)
        return torch.cat([(x[:, :, :1] - first) / sigma, v[:, :, 1:]], dim=2)


def sample_euler_best_of(
    model: torch.nn.Module,
    noise: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None,
    score: Callable[[torch.Tensor, float], torch.Tensor],
    select_sigma: float,
    *,
    motion_guidance: MotionGuidance | Sequence[MotionGuidance] | None = None,
    **steps,
) -> tuple[torch.Tensor, int]:
    """Best of N starts: `sample_euler` from the N noises [N, ...] of one prompt (context [1, L, D]) in one
    batch down to `select_sigma`, then only the candidate that `score(x [N, ...], sigma) -> [N]` rates highest
    goes on to the end. Returns the sample [1, ...] and the index of the kept start.

    The high-noise steps, where the layout and motion of a clip are decided, cost N times; the rest once. With
    N = 1 it is `sample_euler` itself. `select_sigma` = 0 runs every candidate to the end and `score` rates
    the finished samples (a judge of whole clips, `diagvid.verify.DirectionVerifier`): N times every step.
    `steps` are `sample_euler`'s keywords (num_steps, shift, guidance, ...; a run from pure noise: no
    start_sigma or trajectory_at); `motion_guidance` (labels [1]; one or a list) guides every candidate.
    """
    n = noise.shape[0]
    if context.shape[0] != 1:
        raise ValueError(f"one prompt's context [1, L, D] for its {n} starts; got batch {context.shape[0]}")
    if {"start_sigma", "trajectory_at"} & steps.keys():
        raise ValueError("sample_euler_best_of starts from pure noise and keeps no trajectory")
    if not 0 <= select_sigma < 1:
        raise ValueError(f"select_sigma={select_sigma}: the choice is made at a noise level in [0, 1)")

    def each(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
        return None if t is None else t.expand(k, *t.shape[1:])

    guide_all = [replace(g, labels=each(g.labels, n)) for g in _guidance_list(motion_guidance)]
    x, _ = sample_euler(
        model,
        noise,
        each(context, n),
        each(null_context, n),
        motion_guidance=guide_all,
        stop_sigma=select_sigma,
        **steps,
    )
    best = int(score(x, select_sigma).argmax())
    if select_sigma == 0:  # every candidate is finished
        return x[best : best + 1], best
    x, _ = sample_euler(
        model,
        x[best : best + 1],
        context,
        null_context,
        motion_guidance=motion_guidance,
        start_sigma=select_sigma,
        **steps,
    )
    return x, best
