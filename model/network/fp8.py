"""FP8 weights on request (`load_engine(weights="fp8")`, `strokes worker --weights fp8`): the decoder
layers' linear layers as float8 matmuls with dynamic per-token activation scales; bf16 stays the default.

Shapes: M=rows (tokens), K=in features, N=out features.

What is quantized: every nn.Linear inside `language_model.model.layers` (q/k/v/o and the SwiGLU
MLP, both experts): 6.5 of BAGEL's 7.6 billion parameters per expert, all of its matmul FLOPs but
the lm_head's. Embeddings, the lm_head, every norm, the ViT, the connector, the heads and the VAE
stay in bf16. The recipe is torchao's float8 dynamic quantization with row-wise scales (what
flux-fast and SGLang-Diffusion serve on Hopper), written out here so the worker needs no extra
package:
- weight w (N, K) -> w8 = e4m3(w / s_w), s_w (N,) = max|w[n]| / 448, once at load (float32 scales);
- activation x (M, K) -> x8 = e4m3(x / s_x), s_x (M,) = max|x[m]| / 448, on every call;
- y = torch._scaled_mm(x8, w8^T, s_x, s_w) in bf16 (float32 accumulation), plus the bias in bf16.
FP8 tensor cores need compute capability 8.9 (Ada) or 9.0 (Hopper); `require_fp8` says so clearly
anywhere else. On the CPU the same arithmetic runs emulated (`emulate=True`: quantize, dequantize
in float32, a float32 matmul), which is how the tests and bench/fp8_golden.py measure its distance
from bf16 on the golden cases without a GPU. The quantized model is for inference: its state_dict
differs from the checkpoint's (training loads the bf16 modules, whose names are unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
WEIGHTS = ("bf16", "fp8")
FP8_CAPABILITY = (8, 9)


class Fp8Unavailable(ValueError):
    """FP8 weights were asked for where they cannot run; the message says why and what can."""


def require_fp8(device: torch.device) -> None:
    if device.type != "cuda":
        raise Fp8Unavailable(
            f"--weights fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
            f"the model is on {device}: use --weights bf16"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY or not hasattr(torch, "_scaled_mm"):
        raise Fp8Unavailable(
            f"--weights fp8 needs compute capability 8.9+ (Ada, Hopper) and torch._scaled_mm; "
            f"{device} ({torch.cuda.get_device_name(device)}) is {capability[0]}.{capability[1]} "
            f"with torch {torch.__version__}: use --weights bf16"
        )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) -> (float8_e4m3fn (R, C), float32 scales (R, 1)) with x ~ x8 * scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)  # (R, 1)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Linear(nn.Module):
    """A bf16 nn.Linear's FP8 stand-in: float8 weight with per-output-channel scales."""

    def __init__(self, linear: nn.Linear, emulate: bool):
        super().__init__()
        self.in_features, self.out_features, self.emulate = linear.in_features, linear.out_features, emulate
        self.out_dtype = linear.weight.dtype
        w8, scale = quantize_rows(linear.weight.detach())  # (N, K), (N, 1)
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", scale.view(1, -1))  # (1, N)
        self.bias = linear.bias  # bf16, added after the scaled matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # (M, K)
        x8, x_scale = quantize_rows(rows)  # (M, K), (M, 1)
        if self.emulate:
            y = (x8.float() * x_scale) @ (self.weight.float() * self.weight_scale.t()).t()  # (M, N)
            y = y.to(self.out_dtype)
        else:
            m = rows.shape[0]
            pad = -m % 16  # cuBLASLt's FP8 matmul wants row counts in multiples of 16
            if pad:
                x8 = torch.cat([x8, x8.new_zeros(pad, x8.shape[1])])
                x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
            y = torch._scaled_mm(
                x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=self.out_dtype
            )[:m]  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_decoder(language_model: nn.Module, emulate: bool = False) -> int:
    """Swap every nn.Linear of the decoder layers for a Float8Linear in place; returns how many.
    `emulate`: the CPU's float32 emulation (tests, measurements); else the GPU kernel."""
    swapped = 0
    for layer in language_model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Float8Linear(child, emulate))
                    swapped += 1
    return swapped
