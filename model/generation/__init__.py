"""The method on top of the network: loading a checkpoint into the engine, the engine's two loops
(text decoding, image generation under three guidance contexts) with their sampler, and the
process-driven pipeline (plan -> draft -> reflect -> refine) with its parameters, prompts, events,
trajectory, forks, warm contexts, one-shot tasks and branch-parallel denoising.
"""
