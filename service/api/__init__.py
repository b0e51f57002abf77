"""The API process: the FastAPI app, its routes, SSE fan-out and the studio page. Holds no model and
never imports torch, the model's network or the worker (tests/service/test_layout.py)."""
