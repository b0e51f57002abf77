"""What a generation is, without torch: its parameters and limits, prompts, events, fork points,
image sizes. Both processes import it: the API to validate and price a request, the worker to run it;
it imports nothing else of the model (tests/model/test_layout.py).
"""
