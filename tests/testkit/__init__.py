"""Helpers the tests import (on pytest's `pythonpath`, so `import testkit.processes` works from any
test folder and in worker processes started with `--pipeline testkit.pipelines:NAME`). Fixtures live
in the conftest.py files; these modules hold what is not a fixture. Each imports only what it needs,
so a module here costs no more than its own dependencies.

    paths           the repository's folders and the golden fixtures (no dependencies: the GPU check
                    imports it on a machine with torch and pytest only)
    decoding        greedy decoding, static vs eager (torch only, for the same reason)
    imports         the import graph of strokes read from the source, for the layout tests
    processes       real `strokes` API and worker processes on free ports; waiting on a condition
    jobs            job bodies, submitting over HTTP, a job's SSE stream (the client's parser)
    asgi            the API in-process (its own app factory) over httpx, and its error shape
    pipelines       scripted pipelines for in-process workers and `--pipeline` worker processes
    workers         in-process workers built by the worker's own factory
    s3              the S3 blob store's settings against the session's S3 server
    receiver        a webhook receiver on loopback that records (and may refuse) deliveries
    redis_contents  what Redis may hold: references, never images or trajectories
    redis_ha        Redis topologies on loopback: a master with replicas and Sentinels, a Cluster
    studio          the studio's browser tests: a Playwright page, the form's values
"""
