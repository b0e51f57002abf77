"""The studio page in a real browser: Debian's chromium driven by Playwright, against the real API
and worker processes on the tiny checkpoint and a real redis-server.

A person's paths: submit from the page and watch every stage appear in order with its images;
cancel a running job; reload mid-job and resume (Last-Event-ID); open a shared link in a fresh
browser; an invalid field answered next to that field; an API key entered once. Every page must
load nothing from outside the app and log no console errors. A screenshot of a finished job is
saved to artifacts/studio-finished.png (and the phone-width one next to it).

Without a browser these tests skip with a reason in the summary (`make test` installs one).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from testkit.processes import Proc, env_with, start_api, start_worker, wait_for
from testkit.studio import ARTIFACTS, FAST, Page, job_view

from strokes.service.api.routes.studio import WorkerInfo, device_kind
from strokes.service.cli.serve import free_port
from strokes.service.queue import keys

pytestmark = pytest.mark.slow

KEY = "studio-test-key"
SLOW_BODY = {
    "prompt": "x",
    "width": 256,
    "height": 256,
    "max_iterations": 2,
    "draft": {"steps": 40},
    "refine": {"steps": 40},
    "plan": {"max_tokens": 8},
    "reflect": {"max_tokens": 8},
}
# Long enough to act on while it runs (several seconds on the tiny model, longer under load).
SLOW = {"width": 256, "height": 256, "steps": 40, "iterations": 2, "seed": 3, "preview-every": 4}


# Form controls and buttons a screen reader could not name.
UNNAMED_CONTROLS = """() => [...document.querySelectorAll('input, select, textarea, button, progress')]
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
    && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 80))"""


@pytest.fixture(scope="module")
def service(redis_server, tiny_checkpoint, tmp_path_factory) -> Iterator[dict[str, str]]:
    """An open API, one with keys and one with a queue of one place, sharing one worker, on a
    database of their own."""
    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    logdir = tmp_path_factory.mktemp("studio-logs")
    procs = []
    try:
        api, base = start_api(url, logdir, request_defaults="cpu")  # a CPU deployment's defaults
        procs.append(api)
        keyed, keyed_base = start_api(url, logdir, api_keys=KEY, request_defaults="cpu")
        procs.append(keyed)
        capped, capped_base = start_api(url, logdir, queue_cap=1, mean_job_seconds=7, request_defaults="cpu")
        procs.append(capped)
        procs.append(start_worker(url, tiny_checkpoint, logdir, "studio-w"))
        yield {"base": base, "keyed": keyed_base, "capped": capped_base, "redis": url}
    finally:
        for proc in procs:
            proc.stop()


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _expected_order(job: dict) -> list[str]:
    return [f"{s['iteration']}:{s['stage']}" for s in job["stages"]]


def _images_loaded(page) -> list[int]:
    return page.eval_on_selector_all(
        "li.stage img:not([hidden])", "els => els.map(e => e.complete ? e.naturalWidth : -1)"
    )


def _wait_images(page, job: dict) -> None:
    """Until every stage image of the job is on the page, decoded, at its own size."""
    expected = [s["image"]["width"] for s in job["stages"] if s.get("image")]
    assert expected
    wait_for(lambda: _images_loaded(page) == expected, 20, what=f"images of widths {expected} to load")


# ---- the server side ------------------------------------------------------------------------------


def test_info_root_and_assets(service):
    base = service["base"]
    info = httpx.get(base + "/v1/info", timeout=5).json()
    assert info["device"] == "cpu"
    assert info["workers"] == [{"name": "studio-w", "device": "cpu"}]
    assert info["defaults"]["width"] == 256 and info["defaults"]["max_iterations"] == 2  # the cpu profile
    assert info["auth_required"] is False
    assert httpx.get(service["keyed"] + "/v1/info", timeout=5).json()["auth_required"] is True
    paths = httpx.get(base + "/openapi.json", timeout=5).json()["paths"]
    assert info["features"]["job_list"] == ("get" in paths["/v1/generations"])
    assert info["features"]["steering"] == ("/v1/generations/{job_id}/continue" in paths)

    # Entries of workers long gone are forgotten; a fresh one without a heartbeat yet is kept.
    client = redis.Redis.from_url(service["redis"])
    client.hset(keys.WORKER_INFO, "gone", json.dumps({"device": "cuda:0", "at": 0}))
    client.hset(keys.WORKER_INFO, "loading", json.dumps({"device": "cuda:1", "at": time.time()}))
    assert httpx.get(base + "/v1/info", timeout=5).json()["workers"] == info["workers"]
    assert sorted(client.hkeys(keys.WORKER_INFO)) == [b"loading", b"studio-w"]
    client.hdel(keys.WORKER_INFO, "loading")
    client.close()

    root = httpx.get(base + "/?job=gen_x", timeout=5)
    assert root.status_code == 307 and root.headers["location"] == "/studio/?job=gen_x"
    page = httpx.get(base + "/studio/", timeout=5)
    assert page.status_code == 200 and "<title>strokes studio</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        if asset.startswith(("data:", "#", "?")):
            continue
        assert "//" not in asset, asset  # nothing from another origin
        assert httpx.get(f"{base}/studio/{asset}", timeout=5).status_code == 200, asset


def test_the_live_workers_devices_are_summed_up():
    cpu, gpu = WorkerInfo(name="a", device="cpu"), WorkerInfo(name="b", device="cuda:0")
    assert [device_kind(w) for w in ([], [cpu], [gpu], [cpu, gpu])] == ["none", "cpu", "cuda", "mixed"]


# ---- in the browser -------------------------------------------------------------------------------


def test_submit_and_watch_every_stage(service, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    p = Page(context, service["base"])
    p.open()
    assert p.page.url.endswith("/studio/")
    assert p.page.input_value("#width") == "256"  # the server's CPU-sized default
    p.fill("a red cube on a blue sphere", FAST)
    job_id = p.submit()
    p.wait_status("succeeded")

    job = job_view(service["base"], job_id)
    assert job["status"] == "succeeded"
    order = _expected_order(job)
    assert _seen(p.page, order) == order  # each stage appeared once, in order
    stages = {s.split(":")[1] for s in order}
    assert {"plan", "draft", "reflect"} <= stages
    _wait_images(p.page, job)
    for card in p.page.query_selector_all("li.stage"):
        assert re.fullmatch(r"\d+\.\d+ s", card.query_selector(".time").inner_text()), card.inner_text()
    badges = p.page.eval_on_selector_all(
        "li.stage[data-stage=reflect] .badge", "els => els.map(e => e.textContent)"
    )
    assert badges and all(b.startswith("Verdict: ") for b in badges)
    final = p.page.query_selector("li.stage.final img")
    assert final is not None and final.get_attribute("data-image") == job["final_image"]["id"]
    assert "Timings:" in p.page.inner_text(".job .timings")
    unnamed = p.page.evaluate(UNNAMED_CONTROLS)
    assert not unnamed, f"controls without an accessible name: {unnamed}"
    # Steering controls are shown exactly when the server has the steering routes.
    steering = httpx.get(service["base"] + "/v1/info", timeout=5).json()["features"]["steering"]
    assert p.page.is_visible("#pause-after") == steering
    assert bool(p.page.query_selector_all(".steer button, .steer-job button")) == steering

    with p.page.expect_download() as download:
        p.page.click("text=Download trajectory")
    trajectory = json.loads(Path(download.value.path()).read_text())
    assert trajectory == httpx.get(f"{service['base']}/v1/generations/{job_id}/trajectory", timeout=5).json()
    with p.page.expect_download() as download:
        p.page.click("li.stage.final .download")
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The gallery shows it; opening it from there shows the whole job again.
    p.page.wait_for_selector(f".gallery-item[data-job='{job_id}'] img[src^='blob:']")
    ARTIFACTS.mkdir(exist_ok=True)
    p.page.screenshot(path=str(ARTIFACTS / "studio-finished.png"), full_page=True)
    p.page.set_viewport_size({"width": 390, "height": 844})
    p.page.screenshot(path=str(ARTIFACTS / "studio-finished-phone.png"), full_page=True)
    overflow = p.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, "the page scrolls sideways at phone width"
    p.page.click(f".gallery-item[data-job='{job_id}']")
    p.wait_status("succeeded")
    assert p.page.eval_on_selector_all("li.stage", "els => els.length") == len(order)
    p.check_clean()
    context.close()


@pytest.mark.timeout(600)
def test_queue_position_full_queue_then_cancel_a_running_job(service, browser):
    base = service["base"]
    blocker = httpx.post(
        base + "/v1/generations", json={**SLOW_BODY, "prompt": "occupies the worker"}, timeout=10
    ).json()
    wait_for(lambda: job_view(base, blocker["id"])["status"] == "running", 60, what="the blocker to run")
    context = browser.new_context()
    p = Page(context, base)
    p.open()
    p.fill("a slow red cube", SLOW)
    job_id = p.submit()
    p.page.wait_for_selector(".job .queue:has-text('position 1')")
    assert p.page.inner_text(".job .status") == "Queued"
    # The queue is full for an API that admits one waiting job: the page says when to retry.
    full = Page(context, service["capped"])
    full.open()
    full.fill("one too many", FAST)
    full.page.click("#submit")
    full.page.wait_for_selector("#form-error:has-text('The queue is full. Try again in')")
    assert re.search(r"Try again in \d+ s\.", full.page.inner_text("#form-error"))
    full.check_clean(allowed=("status of 429",))
    httpx.delete(f"{base}/v1/generations/{blocker['id']}", timeout=5)

    p.page.wait_for_selector("li.stage[data-stage=draft][data-status=running]", timeout=120000)
    assert p.page.is_hidden(".job .queue")
    # The header's clock runs while the job does (it was frozen at the view's figure).
    p.page.wait_for_selector(".job .timings:has-text('running for')")
    first = int(re.search(r"running for (\d+) s", p.page.inner_text(".job .timings"))[1])
    p.page.wait_for_function(
        "n => (/running for (\\d+) s/.exec(document.querySelector('.job .timings').textContent) || [0, -1])[1] > n",
        arg=first,
        timeout=10000,
    )
    p.page.click(".job button.cancel")
    p.wait_status("canceled", 60)
    assert p.page.inner_text(".job .status") == "Canceled"
    assert job_view(base, job_id)["status"] == "canceled"
    assert p.page.is_hidden(".job button.cancel")
    p.check_clean()
    context.close()


@pytest.mark.timeout(600)
def test_reload_resumes_and_a_shared_link_shows_everything(service, browser):
    context = browser.new_context()
    p = Page(context, service["base"])
    p.open()
    p.fill("a red cube, slowly", SLOW)  # two iterations: a reload after the first preview is mid-job
    job_id = p.submit()
    # The draft emerging: a denoising preview shown, with its progress.
    p.page.wait_for_selector("li.stage[data-stage=draft] img[alt*='preview at step']", timeout=60000)
    assert p.page.get_attribute("li.stage[data-stage=draft] progress", "value") not in (None, "0")
    before = p.page.eval_on_selector_all("li.stage", "els => els.length")
    assert p.event_requests[0].get("last-event-id") is None
    p.event_requests.clear()

    p.page.reload()
    # Restored from this tab's storage at once, then resumed from the last event it had.
    p.page.wait_for_selector(f".job[data-job='{job_id}'] li.stage")
    # (the restored stages are drawn in the page's next frames: wait for them, not for a time)
    p.page.wait_for_function(
        "n => document.querySelectorAll('li.stage').length >= n", arg=before, timeout=10000
    )
    # Playwright's sync API hands over request events only inside its own calls: poll through one.
    wait_for(
        lambda: p.page.wait_for_timeout(50) or p.event_requests,
        10,
        what="the events request after the reload",
    )
    assert re.fullmatch(r"\d+-\d+", p.event_requests[0].get("last-event-id", ""))
    p.wait_status("succeeded", 180)
    job = job_view(service["base"], job_id)
    cards = p.page.eval_on_selector_all(
        "li.stage", "els => els.map(e => e.dataset.iteration + ':' + e.dataset.stage)"
    )
    assert cards == _expected_order(job)
    _wait_images(p.page, job)
    p.check_clean()
    context.close()

    # Someone else opens the link: no stored state, the whole job is replayed from the start.
    other = browser.new_context()
    q = Page(other, service["base"])
    q.open(f"/?job={job_id}")
    q.wait_status("succeeded")
    assert _seen(q.page, _expected_order(job)) == _expected_order(job)
    assert q.event_requests[0].get("last-event-id") is None
    _wait_images(q.page, job)
    q.check_clean()
    other.close()


def test_invalid_field_is_shown_next_to_it(service, browser):
    context = browser.new_context()
    p = Page(context, service["base"])
    p.open()
    p.fill("a red cube", {**FAST, "width": 100})
    p.page.press("#width", "Enter")  # the keyboard submits the form
    p.page.wait_for_selector("#width[aria-invalid=true]")
    assert "multiple of 16" in p.page.inner_text("#width-error")
    assert p.page.evaluate("document.activeElement.id") == "width"
    assert "correct the field" in p.page.inner_text("#form-error")
    assert "job=" not in p.page.url
    p.page.fill("#width", "64")
    p.page.fill("#steps", "1")
    p.page.click("#submit")
    p.page.wait_for_selector("#steps[aria-invalid=true]")
    assert p.page.get_attribute("#width", "aria-invalid") is None
    assert "greater than or equal to 2" in p.page.inner_text("#steps-error")
    p.check_clean(allowed=("status of 422",))  # the browser logs the failed POST itself
    context.close()


def test_every_invalid_field_is_shown_at_its_field_at_once(service, browser):
    context = browser.new_context()
    p = Page(context, service["base"])
    p.open()
    p.fill("a red cube", {**FAST, "width": 100, "steps": 1, "iterations": 99})
    p.page.click("#submit")
    p.page.wait_for_selector("#iterations[aria-invalid=true]")
    for field in ("width", "steps", "iterations"):  # all three, each with its own message
        assert p.page.get_attribute(f"#{field}", "aria-invalid") == "true", field
    assert "multiple of 16" in p.page.inner_text("#width-error")
    assert "greater than or equal to 2" in p.page.inner_text("#steps-error")
    assert "less than or equal to 8" in p.page.inner_text("#iterations-error")
    assert p.page.evaluate("document.activeElement.id") == "width"  # the first, focused
    assert "the 3 fields marked above" in p.page.inner_text("#form-error")
    p.check_clean(allowed=("status of 422",))
    context.close()


def test_api_key_entered_once(service, browser):
    context = browser.new_context()
    p = Page(context, service["keyed"])
    p.open()
    p.page.wait_for_selector("#key-panel:not([hidden])")
    p.page.fill("#api-key", KEY)
    p.page.press("#api-key", "Enter")
    p.page.wait_for_selector("#key-panel[hidden]", state="attached")
    assert p.page.evaluate("localStorage.getItem('strokes.apiKey')") == KEY
    p.fill("a keyed red cube", {**FAST, "iterations": 1})
    # A starting image dropped on the form (a real drop event with the file in its DataTransfer).
    png = base64.b64encode(_png(48, 32)).decode()
    transfer = p.page.evaluate_handle(
        """(b64) => { const dt = new DataTransfer();
        dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], 'start.png', {type: 'image/png'}));
        return dt; }""",
        png,
    )
    p.page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    p.page.wait_for_selector("#image-preview:not([hidden]) img[src^='data:image/png']")
    job_id = p.submit()
    p.wait_status("succeeded")
    job = job_view(service["keyed"], job_id, KEY)
    assert job["status"] == "succeeded" and job["request"]["input_image"] is True
    assert "from a starting image" in p.page.inner_text(".job .meta")
    p.page.wait_for_selector(".job .input-image:not([hidden]) img[src^='blob:']")
    wait_for(
        lambda: p.page.eval_on_selector(".job .input-image img", "e => e.complete && e.naturalWidth") == 48,
        10,
        what="the starting image to show beside the job",
    )
    _wait_images(p.page, job)
    ARTIFACTS.mkdir(exist_ok=True)
    p.page.screenshot(path=str(ARTIFACTS / "studio-starting-image.png"), full_page=True)
    # A reload needs no key again.
    p.page.reload()
    p.wait_status("succeeded")
    assert p.page.is_hidden("#key-panel")
    p.check_clean()
    context.close()


def test_page_modules_parse_streams_plans_and_reflections(service, browser):
    """The page's own parsers, run in the browser on inputs the live tests cannot force (the tiny
    model writes no tags): SSE split anywhere, even inside a CRLF; <ins>/<des> while streaming;
    the corrective instruction; a new attempt starting the stages over."""
    context = browser.new_context()
    p = Page(context, service["base"])
    p.open()
    result = p.page.evaluate(
        """async () => {
        const { ApiError, SseParser, describe } = await import('/studio/api.js');
        const err = (status, body, headers) => describe(new ApiError(status, body, new Headers(headers)));
        const words = [
          err(429, {error: {type: 'queue_full', message: 'the queue is full; retry in 7 s'}}, {'Retry-After': '7'}),
          err(503, {error: {type: 'service_unavailable', message: 'the job store is unreachable'}}, {'Retry-After': '1'}),
          err(401, {error: {type: 'unauthorized', message: 'a valid bearer API key is required'}}, {}),
          describe(new TypeError('Failed to fetch')),
        ];
        const { newState, parsePlan, reduce, splitReflection } = await import('/studio/state.js');
        const events = [];
        const parser = new SseParser((e) => events.push(e));
        const wire = ': hello\\r\\n\\r\\nid: 1-0\\r\\nevent: text.delta\\r\\ndata: {"a":1}\\r\\n\\r\\n'
          + 'event: x\\ndata: two\\ndata: lines\\n\\nid: 2-5\\revent: y\\rdata:\\r\\r';
        for (const ch of wire) parser.feed(ch);
        const s = newState('gen_x');
        reduce(s, 'job.started', {attempt: 1});
        reduce(s, 'stage.started', {iteration: 1, stage: 'plan', ts: 1});
        reduce(s, 'text.delta', {iteration: 1, stage: 'plan', delta: '<ins>a cube'});
        const streaming = parsePlan(s.iterations[1].stages.plan.text);
        const reset = reduce(s, 'job.started', {attempt: 2, takeover: true});
        return {
          words,
          events,
          streaming,
          plan: parsePlan('Step: <ins>add a red cube</ins> <des>a red cube on a blue sphere</des>'),
          untagged: parsePlan('just words'),
          reflection: splitReflection('The intermediate step is wrong. The corrective instruction is: <refine>make it red</refine>'),
          open: splitReflection('wrong. <refine>make it re'),
          reset: [...reset], iterations: Object.keys(s.iterations).length, note: s.note,
        };
    }"""
    )
    assert result["words"] == [
        "The queue is full. Try again in 7 s.",
        "The service is unavailable right now (the job store is unreachable). Try again in 1 s.",
        "The service needs a valid API key: enter it above.",
        "Cannot reach the service: check the connection and try again.",
    ]
    assert result["events"] == [
        {"id": "1-0", "event": "text.delta", "data": '{"a":1}'},
        {"id": "1-0", "event": "x", "data": "two\nlines"},
        {"id": "2-5", "event": "y", "data": ""},
    ]
    assert result["streaming"] == {"ins": "a cube", "des": None, "rest": ""}
    assert result["plan"] == {"ins": "add a red cube", "des": "a red cube on a blue sphere", "rest": "Step:"}
    assert result["untagged"] == {"ins": None, "des": None, "rest": "just words"}
    assert result["reflection"] == [
        {"text": "The intermediate step is wrong. The corrective instruction is: ", "corrective": False},
        {"text": "make it red", "corrective": True},
    ]
    assert result["open"][-1] == {"text": "make it re", "corrective": True}
    assert "all" in result["reset"] and result["iterations"] == 0 and "took the job over" in result["note"]
    p.check_clean()
    context.close()


def test_steering_controls_hand_the_contracts_fork_specs(service, browser):
    """Without steering routes the page hides the controls (checked above). Here they are switched
    on for one job view by hand, to check what each control hands to the page's fork hook: the
    request field `fork` of the steering contract (issue 13)."""
    base = service["base"]
    body = {**SLOW_BODY, "width": 64, "height": 64, "max_iterations": 1, "seed": 3}
    body.update(draft={"steps": 4}, refine={"steps": 4})
    job_id = httpx.post(base + "/v1/generations", json=body, timeout=10).json()["id"]
    wait_for(lambda: job_view(base, job_id)["status"] == "succeeded", 120, what="the job to succeed")
    context = browser.new_context()
    p = Page(context, base)
    p.open()
    p.page.evaluate(
        """async (id) => {
        const { JobView } = await import('/studio/job.js');
        const { Api } = await import('/studio/api.js');
        window.__forks = [];
        const hooks = { steering: true, announce() {}, fork: async (view, spec) => { window.__forks.push(spec); } };
        const view = new JobView(new Api(), id, hooks);
        document.getElementById('branches').append(view.el);
        if (await view.load()) await view.run();
    }""",
        job_id,
    )
    p.wait_status("succeeded")
    plan_text = p.page.inner_text("li.stage[data-stage=plan] .raw")
    p.page.click("li.stage[data-stage=plan] .steer button:has-text('Edit this plan')")
    area = "li.stage[data-stage=plan] .steer textarea"
    assert p.page.evaluate("document.activeElement.tagName") == "TEXTAREA"
    assert p.page.input_value(area).strip() == plan_text.strip()
    p.page.fill(area, "<ins>draw a red cube</ins> <des>a red cube on a blue sphere</des>")
    p.page.click("li.stage[data-stage=plan] .steer button:has-text('Fork from here')")
    p.page.wait_for_selector(area, state="detached")

    verdict = job_view(base, job_id)["stages"][2]["verdict"]
    assert verdict != "correct"  # the tiny model's reflections are never a clear "correct"
    p.page.click("li.stage[data-stage=reflect] .steer button:has-text('Call it correct')")
    p.page.click("li.stage[data-stage=reflect] .steer button:has-text('Write the corrective instruction')")
    p.page.fill("li.stage[data-stage=reflect] .steer textarea", "make the cube red")
    p.page.click("li.stage[data-stage=reflect] .steer button:has-text('Fork from here')")
    p.page.click(".steer-job button:has-text('Continue with an instruction')")
    p.page.fill(".steer-job textarea", "now add a green cone")
    p.page.click(".steer-job button:has-text('Start the new branch')")
    wait_for(lambda: len(p.page.evaluate("window.__forks")) == 4, 10, what="four forks")
    assert p.page.evaluate("window.__forks") == [
        {
            "job_id": job_id,
            "iteration": 1,
            "stage": "plan",
            "text": "<ins>draw a red cube</ins> <des>a red cube on a blue sphere</des>",
        },
        {"job_id": job_id, "iteration": 1, "stage": "reflect", "text": "The intermediate step is correct."},
        {
            "job_id": job_id,
            "iteration": 1,
            "stage": "reflect",
            "text": "The intermediate step is wrong. The corrective instruction is: <refine>make the cube red</refine>",
        },
        {"job_id": job_id, "instruction": "now add a green cone"},
    ]
    p.check_clean()
    context.close()


@pytest.mark.timeout(600)
def test_the_stream_resumes_after_the_api_restarts(service, browser, tmp_path):
    """The API goes away mid-job and comes back on the same address: the page says it lost the
    connection, keeps trying, and resumes with Last-Event-ID, missing nothing."""
    port = free_port()
    env = env_with(service["redis"])
    api = Proc(["api", "--port", str(port)], env, tmp_path / "api-1.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(base), 30, what="the API to start")
        context = browser.new_context()
        p = Page(context, base)
        p.open()
        p.fill("a red cube through a restart", SLOW)
        job_id = p.submit()
        p.page.wait_for_selector("li.stage[data-stage=draft][data-status=running]", timeout=60000)
        api.stop()
        p.page.wait_for_selector(".job .note:has-text('reconnecting')", timeout=30000)
        p.event_requests.clear()
        api = Proc(["api", "--port", str(port)], env, tmp_path / "api-2.log")
        p.page.wait_for_selector(".job .note:empty", state="attached", timeout=60000)  # connected again
        p.wait_status("succeeded", 180)
        assert p.event_requests and re.fullmatch(r"\d+-\d+", p.event_requests[0].get("last-event-id", ""))
        job = job_view(base, job_id)
        assert _seen(p.page, _expected_order(job)) == _expected_order(job)
        assert p.page.inner_text(".job .note") == ""
        _wait_images(p.page, job)
        # The cut stream and the retries while the API was away are network errors the browser
        # logs itself; nothing else may be in the console.
        dropped = (
            "net::ERR_CONNECTION_REFUSED",
            "net::ERR_EMPTY_RESPONSE",
            "net::ERR_INCOMPLETE_CHUNKED_ENCODING",
        )
        p.check_clean(allowed=dropped)
        context.close()
    finally:
        api.stop()


def _seen(page, expected: list[str]) -> list[str]:
    """The stage cards in the order they appeared, once as many as `expected` are drawn: the
    job's status can show before the frame that draws its last events."""
    page.wait_for_function("n => (window.__seen || []).length >= n", arg=len(expected))
    return page.evaluate("window.__seen")


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
