"""The BAGEL network and its numerics: configuration from the checkpoint's JSON files, attention,
the Mixture-of-Transformers decoder and its KV cache, the vision tower, the VAE, the composition
(bagel.py), static-shape decode steps, the tokenizer and the image transforms.

Nothing here imports model.generation: the network knows nothing of stages, jobs or the engine.
"""
