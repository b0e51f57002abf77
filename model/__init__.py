"""BAGEL-7B-MoT inference in native PyTorch, and the process-driven generation pipeline on it.

The model package knows nothing of HTTP or Redis: its engine and pipeline yield events.
"""
