"""BAGEL-7B-MoT inference in native PyTorch, and the process-driven generation pipeline on it.

The model package knows nothing of HTTP or Redis: its engine and pipeline yield events.

    network/     the BAGEL network and its numerics (config, attention, decoder, KV cache, ViT, VAE,
                 tokenizer, transforms); imports nothing from generation/
    generation/  the method on top of it: checkpoint loading, the engine and its two loops, the
                 plan -> draft -> reflect -> refine pipeline, forks, warm contexts, parallel branches
    testing/     tiny random checkpoints and golden-case replay (imports both of the above)
    commands.py  the `strokes` subcommands that run the model in-process; devices.py their device default
"""
