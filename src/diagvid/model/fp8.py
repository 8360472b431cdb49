"""FP8 linear layers for the transformer blocks (issue 10's optional lever, off unless asked for).

Each `nn.Linear` inside the DiT's blocks becomes an `FP8Linear`: its weight is stored in float8 e4m3 with
one scale per output row, each input row (a token) is rounded to e4m3 with its own scale as it arrives, and
the product is one `torch._scaled_mm` with those row-wise scales, then the bias in the layer's precision.
This is the scheme torchao calls dynamic float8 activations and weights, per row. torch runs it on a CPU
(through oneDNN) as well as on CUDA (compute capability 8.9 and up), so the quality cost is measured on
the toy world on a CPU with the same arithmetic a GPU uses, up to the order of the sums.

The embeddings, the time projection and the output head stay in their precision, as quantisation recipes
for diffusion transformers leave them: they are a small share of the compute and the most sensitive.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
MIN_CUDA_CAPABILITY = (8, 9)


def to_e4m3_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 values [M, K], float32 scales [M, 1]) with x ~= values * scales: each row's largest
    magnitude maps to e4m3's largest finite value (448). An all-zero row gets scale 1 rather than 0."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class FP8Linear(nn.Module):
    """A frozen `nn.Linear` whose product runs in float8 e4m3 with row-wise scales (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = to_e4m3_rowwise(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in], row-major: its transpose is the column-major B
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse: bool = True):
        # `model.to(torch.bfloat16)` casts every floating buffer, float8 ones too: the weight and its float32
        # scales keep their dtypes (a bf16 scale would lose bits for good) and move with the device alone
        kept = {"weight": self.weight, "weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        values, scale = to_e4m3_rowwise(rows)
        # CUDA's row-wise kernels write bf16 only; the result then goes back to the input's precision
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        y = torch._scaled_mm(
            values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=out_dtype
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def check_fp8_device(device: torch.device | str) -> None:
    """ValueError unless `device` runs float8 products: any CPU, or CUDA of compute capability >= 8.9."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"fp8 runs on a CPU or a CUDA device; device is {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CUDA_CAPABILITY:
        have, need = ".".join(map(str, capability)), ".".join(map(str, MIN_CUDA_CAPABILITY))
        raise ValueError(
            f"fp8 needs CUDA compute capability >= {need} (Ada, Hopper or later); "
            f"{torch.cuda.get_device_name(device)} has {have}"
        )


def quantize_fp8(model: nn.Module) -> int:
    """Replace every `nn.Linear` under `model.blocks` by an `FP8Linear`, in place; returns how many.

    Both dimensions of each layer must be multiples of 16 (the float8 kernels' tiles); a model with a
    layer that is not is refused before any layer changes.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to run in fp8")
    check_fp8_device(next(model.parameters()).device)
    targets = [(name, m) for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name, m in targets:
        if m.in_features % 16 or m.out_features % 16:
            raise ValueError(
                f"blocks.{name} is {m.in_features} -> {m.out_features}; fp8 needs both multiples of 16"
            )
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, FP8Linear(m))
    return len(targets)
