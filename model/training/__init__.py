"""Fine-tuning BAGEL on process trajectories (`strokes train`), with the official training forward.

    samples.py       the dataset format (JSONL + image files) and its validation
    trajectories.py  service trajectory exports -> samples (`strokes data from-trajectories`)
    plan.py          a sample -> the official sequence plan (text / vae_image / vit_image items)
    packing.py       the official `pack_sequence`: packed tensors, positions, masks, labels
    forward.py       the official training forward on the shared network: per-token CE and MSE
    losses.py        the official loss reduction
    base.py          the base model of a run, from a checkpoint folder (TrainingBagel + frozen VAE)
    lora.py          low-rank adapters on the experts' projections
    data.py          epochs, packs, ranks and the data position
    optim.py         AdamW, the warmup-cosine schedule, gradient clipping, EMA
    distributed.py   torchrun + FSDP2 (`fully_shard`)
    checkpoint.py    save and resume (model, optimizer, schedule, data position, RNG)
    export.py        the official checkpoint layout, or a LoRA adapter
    trainer.py       the loop: accumulation, activation checkpointing, bf16, metrics
    commands.py      `strokes train`, `strokes train-export`, `strokes data ...`

Training may import spec, network and generation; nothing there imports training.
"""
