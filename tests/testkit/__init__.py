"""Helpers the tests import (on pytest's `pythonpath`, so `import testkit.processes` works from any
test folder and in worker processes started with `--pipeline testkit.pipelines:NAME`). Fixtures live
in the conftest.py files; these modules hold what is not a fixture.

    paths      the repository's folders and the golden fixtures (no dependencies: the GPU check
               imports it on a machine with torch and pytest only)
    imports    the import graph of strokes read from the source, for the layout tests
    processes  real `strokes` API and worker processes on free ports, and waiting on conditions
    jobs       job bodies, submitting over HTTP and reading a job's SSE stream
    s3         the S3 blob store's settings against the test session's S3 server
    pipelines  scripted pipelines for in-process workers and `--pipeline` worker processes
"""
