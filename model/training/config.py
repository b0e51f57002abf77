"""Every option of a training run (`strokes train` has one flag per field, named after it).

Torch-free, so that building the `strokes` command's parser (every process does) loads no torch:
the run's pieces are made from it in trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from strokes.model import devices

if TYPE_CHECKING:
    from strokes.model.training.lora import LoRAConfig
    from strokes.model.training.optim import OptimConfig

# The projections a LoRA adapter may target, in both experts (checkpoint-exact names).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run (`strokes train` has one flag per field, named after it)."""

    data: str = _opt(None, "the dataset: a JSONL file of samples (docs/training.md)")
    checkpoint: str = _opt(None, "the base model: a BAGEL checkpoint folder in the official layout")
    out: str = _opt(None, "the run folder: log.jsonl, checkpoints/, export/")
    mode: str = _opt(
        "lora", "lora: adapters on the experts' projections; full: every weight", ("lora", "full")
    )
    lora_rank: int = _opt(16, "rank of the adapters")
    lora_alpha: float = _opt(32.0, "adapter scale alpha (the update is alpha / rank * B A)")
    lora_experts: str = _opt("und,gen", "experts with adapters: und (text, ViT), gen (images), or both")
    lora_targets: str = _opt(",".join(ATTENTION + MLP), "the projections adapted, comma-separated")
    lora_full: str = _opt("", "small modules trained in full beside the adapters, e.g. llm2vae,vae2llm")
    steps: int = _opt(10_000, "optimizer steps in all (the schedule's length)")
    lr: float = _opt(2e-5, "peak learning rate")
    min_lr: float = _opt(1e-7, "the cosine schedule's floor")
    warmup_steps: int = _opt(200, "linear warmup steps (the first step runs at lr 0, as the official script)")
    schedule: str = _opt("cosine", "learning-rate schedule after the warmup", ("cosine", "constant"))
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-15, "AdamW epsilon")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "clip the gradients' total norm to this (0: no clipping)")
    accumulation: int = _opt(1, "micro-steps (packs) per optimizer step and process")
    max_tokens: int = _opt(32_768, "tokens per pack (the official expected_num_tokens)")
    timestep_shift: float = _opt(1.0, "shift of the training timesteps, t = s t / (1 + (s-1) t)")
    ce_weight: float = _opt(1.0, "weight of the cross-entropy")
    mse_weight: float = _opt(1.0, "weight of the flow-matching MSE")
    ce_reweighting: bool = _opt(False, "weight CE tokens by 1/sqrt(text length), the official option")
    text_dropout: float = _opt(0.1, "probability of dropping a prompt (for text guidance)")
    vit_dropout: float = _opt(0.3, "probability of dropping a seen image's ViT tokens (image guidance)")
    vae_dropout: float = _opt(0.3, "probability of dropping a seen image's clean latents (image guidance)")
    precision: str = _opt(
        "auto",
        "bf16 autocast with float32 master weights, or fp32 (auto: bf16 on CUDA)",
        ("auto", "bf16", "fp32"),
    )
    activation_checkpointing: bool = _opt(True, "recompute each decoder layer in the backward")
    ema: float = _opt(0.0, "EMA decay of the weights (0: no EMA; the official runs use 0.9999)")
    save_every: int = _opt(500, "write a checkpoint every N steps (and at the end)")
    keep: int = _opt(2, "checkpoints kept")
    log_every: int = _opt(10, "a progress line and a log.jsonl record every N steps")
    seed: int = _opt(42, "seed of the data order, the draws and the adapters' initialisation")
    resume: str = _opt(
        "auto", "auto: from the run folder's latest checkpoint if any; never; or a checkpoint folder"
    )
    device: str = _opt(devices.AUTO, devices.HELP)
    num_workers: int = _opt(2, "DataLoader processes decoding images")
    export: str = _opt(
        "auto",
        "at the end: adapter, checkpoint (merged for LoRA), none; auto: adapter for LoRA, checkpoint for full",
        ("auto", "adapter", "checkpoint", "none"),
    )

    def __post_init__(self):
        for name in ("data", "checkpoint", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if self.mode == "full" and self.export == "adapter":
            raise ValueError("export: a full fine-tuning run exports a checkpoint, not an adapter")
        for name in ("steps", "accumulation", "max_tokens", "save_every", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")

    def lora(self) -> LoRAConfig:
        from strokes.model.training.lora import LoRAConfig  # torch: only when a run is built

        split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
        return LoRAConfig(
            self.lora_rank,
            self.lora_alpha,
            split(self.lora_experts),
            split(self.lora_targets),
            split(self.lora_full),
        )

    def optim(self) -> OptimConfig:
        from strokes.model.training.optim import OptimConfig  # torch: only when a run is built

        return OptimConfig(
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            total_steps=self.steps,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )


CONFIG_FIELDS = fields(TrainConfig)
