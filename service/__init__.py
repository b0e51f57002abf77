"""strokes HTTP service: FastAPI front end, Redis queue, GPU workers, SSE streaming.

The service knows nothing of tensors: it talks to the model only through the pipeline's events.
"""
