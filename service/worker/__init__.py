"""The worker process: the loop that takes jobs from the queue, runs each on the loaded pipeline and
publishes its events. Never imports the API's routes (tests/service/test_layout.py)."""
