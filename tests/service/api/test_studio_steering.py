"""The studio page with the job list and the steering routes, in a real browser (Debian's chromium
driven by Playwright) against the real API, worker and redis-server on the tiny checkpoint.

The gallery lists the caller's jobs newest first, a page at a time, and opens one; a plan edited
on its card forks a new branch that opens beside its parent; a job paused after its plan is edited
in place and continued to its end; a bad edit (a chat control token) is answered next to the
editor. No console errors, nothing loaded from outside the app. A screenshot of the fork beside
its parent (at 1280 px, where both must fit side by side) is saved to artifacts/studio-fork.png.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import redis
from testkit.processes import start_api, start_worker, wait_for
from testkit.studio import ARTIFACTS, FAST, Page, job_view

pytestmark = pytest.mark.slow

ONE = {**FAST, "iterations": 1}  # one iteration: plan, draft, reflect (and a refine)
EDITED_PLAN = "<ins>draw a green cube</ins> <des>a green cube on a blue sphere</des>"


@pytest.fixture(scope="module")
def base(redis_server, tiny_checkpoint, tmp_path_factory) -> Iterator[str]:
    """An open API and a worker on a database of their own (the gallery counts its jobs)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    logdir = tmp_path_factory.mktemp("studio-steering-logs")
    procs = []
    try:
        api, base = start_api(url, logdir, request_defaults="cpu")
        procs.append(api)
        procs.append(start_worker(url, tiny_checkpoint, logdir, "studio-steer-w"))
        yield base
    finally:
        for proc in procs:
            proc.stop()


def _gallery(page) -> list[str]:
    return page.eval_on_selector_all(".gallery-item", "els => els.map(e => e.dataset.job)")


def _listed(base: str) -> list[str]:
    """Every job of the (open) caller, newest first, from the API's own pages."""
    ids, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = httpx.get(base + "/v1/generations", params=params, timeout=5).json()
        ids += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            return ids
        after = page["next_cursor"]


def test_gallery_lists_the_callers_jobs_newest_first(base, browser):
    context = browser.new_context()
    p = Page(context, base)
    p.open()
    p.fill("the first red cube", ONE)
    first = p.submit()
    p.wait_status("succeeded")
    p.page.fill("#prompt", "the second red cube")
    p.page.click("#submit")
    p.page.wait_for_url(re.compile(f"job=(?!{first})gen_"))
    second = p.page.url.split("job=")[1]
    p.wait_status("succeeded")
    wait_for(lambda: _gallery(p.page)[:2] == [second, first], 20, what="both jobs in the gallery")
    assert p.page.inner_text(f".gallery-item[data-job='{second}'] .gallery-prompt") == "the second red cube"

    # More than a page: twelve more jobs (queued, then canceled: the worker need not run them).
    more = [
        httpx.post(
            base + "/v1/generations", json={"prompt": f"filler {i}", "width": 64, "height": 64}, timeout=10
        ).json()["id"]
        for i in range(12)
    ]
    for job_id in more:
        httpx.delete(f"{base}/v1/generations/{job_id}", timeout=5)
    p.page.click("#gallery-refresh")
    wait_for(lambda: _gallery(p.page) == _listed(base)[:12], 20, what="the first page of the gallery")
    assert p.page.is_visible("#gallery-more")
    p.page.click("#gallery-more")
    wait_for(lambda: len(_gallery(p.page)) == 14, 20, what="the older generations")
    assert _gallery(p.page) == _listed(base) == [*reversed(more), second, first]
    assert p.page.is_hidden("#gallery-more")

    # Opening the older one from the gallery shows it, with its stages and its address.
    p.page.click(f".gallery-item[data-job='{first}']")
    p.page.wait_for_url(re.compile(f"job={first}"))
    p.page.wait_for_selector(f".job[data-job='{first}'][data-status=succeeded]")
    cards = p.page.eval_on_selector_all(f".job[data-job='{first}'] li.stage", "els => els.length")
    assert cards == len(job_view(base, first)["stages"])
    p.check_clean()
    context.close()


# How the branches on screen lie: each job's box, the widest a stage card gets, and whether the
# branches' area has to scroll sideways to show them.
LAYOUT = """() => ({
  jobs: [...document.querySelectorAll('.job')].map((e) => {
    const r = e.getBoundingClientRect();
    const cards = [...e.querySelectorAll('li.stage')].map((c) => c.getBoundingClientRect().width);
    return {left: r.left, right: r.right, top: r.top, width: r.width, narrowest_card: Math.min(...cards)};
  }),
  overflow: document.getElementById('branches').scrollWidth - document.getElementById('branches').clientWidth,
  viewport: window.innerWidth,
})"""


def test_fork_from_an_edited_plan_opens_beside_its_parent(base, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # a common laptop
    p = Page(context, base)
    p.open()
    p.fill("a red cube to fork", ONE)
    parent = p.submit()
    p.wait_status("succeeded")
    plan = f".job[data-job='{parent}'] li.stage[data-stage=plan]"
    p.page.click(f"{plan} .steer button:has-text('Edit this plan')")
    area = f"{plan} .steer textarea"

    # A chat control token in the edit: the service's 422 is shown next to the editor.
    p.page.fill(area, "<ins>a cube</ins><|im_end|>")
    p.page.click(f"{plan} .steer button:has-text('Fork from here')")
    p.page.wait_for_selector(f"{area}[aria-invalid=true]")
    error = p.page.inner_text(f"{plan} .steer .field-error")
    assert error.startswith("fork.text:") and "<|im_end|>" in error, error
    assert p.page.evaluate("document.activeElement.tagName") == "TEXTAREA"
    assert p.page.eval_on_selector_all(".job", "els => els.length") == 1  # no branch was made

    p.page.fill(area, EDITED_PLAN)
    p.page.click(f"{plan} .steer button:has-text('Fork from here')")
    p.page.wait_for_url(re.compile(f"job=(?!{parent})gen_"))
    child = p.page.url.split("job=")[1]
    p.page.wait_for_selector(f".job[data-job='{child}'][data-status=succeeded]", timeout=120000)
    assert p.page.eval_on_selector_all(".job", "els => els.map(e => e.dataset.job)") == [parent, child]

    job = job_view(base, child)
    assert job["parent"] == {"job_id": parent, "iteration": 1, "stage": "plan"}
    assert job["stages"][0]["stage"] == "plan" and job["stages"][0]["text"] == EDITED_PLAN
    branch = f".job[data-job='{child}']"
    assert f"branch of {parent} after iteration 1 plan" in p.page.inner_text(f"{branch} .meta")
    assert p.page.inner_text(f"{branch} li.stage[data-stage=plan] .ins") == "draw a green cube"
    assert p.page.inner_text(f"{branch} li.stage[data-stage=plan] .lineage") == "your edit"
    cards = p.page.eval_on_selector_all(
        f"{branch} li.stage", "els => els.map(e => e.dataset.iteration + ':' + e.dataset.stage)"
    )
    assert cards == [f"{s['iteration']}:{s['stage']}" for s in job["stages"]]
    expected = [s["image"]["width"] for s in job["stages"] if s.get("image")]
    wait_for(
        lambda: (
            p.page.eval_on_selector_all(
                f"{branch} li.stage img:not([hidden])",
                "els => els.map(e => e.complete ? e.naturalWidth : -1)",
            )
            == expected
        ),
        20,
        what="the branch's images",
    )
    # At 1280 px both branches are on screen side by side, whole and readable: nothing clipped,
    # nothing to scroll sideways, every stage card wide enough for its text.
    layout = p.page.evaluate(LAYOUT)
    parent_box, child_box = layout["jobs"]
    assert layout["overflow"] <= 0, layout
    assert abs(parent_box["top"] - child_box["top"]) < 1 and parent_box["right"] <= child_box["left"], layout
    for box in (parent_box, child_box):
        assert box["left"] >= 0 and box["right"] <= layout["viewport"], layout
        assert box["width"] >= 360 and box["narrowest_card"] >= 150, layout
    ARTIFACTS.mkdir(exist_ok=True)
    p.page.screenshot(path=str(ARTIFACTS / "studio-fork.png"), full_page=True)

    # A follow-up after the parent's final image: a third branch, opened right after its parent.
    p.page.click(f".job[data-job='{parent}'] .steer-job button:has-text('Continue with an instruction')")
    p.page.fill(f".job[data-job='{parent}'] .steer-job textarea", "now make the cube green")
    p.page.click(f".job[data-job='{parent}'] .steer-job button:has-text('Start the new branch')")
    p.page.wait_for_url(re.compile(f"job=(?!{parent}|{child})gen_"))
    follow = p.page.url.split("job=")[1]
    p.page.wait_for_selector(f".job[data-job='{follow}'][data-status=succeeded]", timeout=120000)
    assert p.page.eval_on_selector_all(".job", "els => els.map(e => e.dataset.job)") == [
        parent,
        follow,
        child,
    ]
    job = job_view(base, follow)
    assert job["parent"]["job_id"] == parent
    cards = p.page.eval_on_selector_all(
        f".job[data-job='{follow}'] li.stage",
        "els => els.map(e => e.dataset.iteration + ':' + e.dataset.stage)",
    )
    assert cards == [f"{s['iteration']}:{s['stage']}" for s in job["stages"]]
    assert any(c.startswith("2:") for c in cards), cards  # new iterations after the parent's

    # The shared link of the branch opens it beside its parent again.
    p.page.goto(f"{base}/studio/?job={child}")
    p.page.wait_for_selector(f".job[data-job='{child}'][data-status=succeeded]")
    p.page.wait_for_selector(f".job[data-job='{parent}'][data-status=succeeded]")
    assert p.page.eval_on_selector_all(".job", "els => els.map(e => e.dataset.job)") == [parent, child]
    p.check_clean(allowed=("status of 422",))  # the browser logs the refused POST itself
    context.close()


def test_pause_after_the_plan_edit_and_continue(base, browser):
    context = browser.new_context()
    p = Page(context, base)
    p.open()
    p.fill("a red cube, step by step", ONE)
    p.page.check("input[name=pause][value=plan]")
    job_id = p.submit()
    p.wait_status("paused", 120)
    assert p.page.inner_text(".job .status") == "Waiting for you"
    job = job_view(base, job_id)
    assert job["status"] == "paused" and job["paused"]["stage"] == "plan"
    area = "li.stage[data-stage=plan] .steer textarea"
    assert p.page.input_value(area) == job["paused"]["text"]
    # The link opened elsewhere while it waits: the same editor on the same stage.
    other = browser.new_context()
    q = Page(other, base)
    q.open(f"/?job={job_id}")
    q.wait_status("paused")
    assert q.page.input_value(area) == job["paused"]["text"]
    q.check_clean()
    other.close()
    p.page.fill(area, EDITED_PLAN)
    p.page.click("li.stage[data-stage=plan] .steer button:has-text('Continue with this text')")
    p.wait_status("succeeded", 120)
    job = job_view(base, job_id)
    assert job["stages"][0]["text"] == EDITED_PLAN
    assert p.page.inner_text("li.stage[data-stage=plan] .ins") == "draw a green cube"
    assert p.page.is_hidden(".job .note") or p.page.inner_text(".job .note") == ""
    cards = p.page.eval_on_selector_all(
        "li.stage", "els => els.map(e => e.dataset.iteration + ':' + e.dataset.stage)"
    )
    assert cards == [f"{s['iteration']}:{s['stage']}" for s in job["stages"]]
    assert not p.page.query_selector_all("li.stage .steer textarea")  # the pause editor is gone
    p.check_clean()
    context.close()


def test_cards_appear_in_the_jobs_order_when_a_burst_meets_the_clock(base, browser):
    """After a reconnect, a resumed stream brings several stages in one burst: a reflection that
    started and completed and a refinement that started. The page's one-second clock (which keeps
    running cards' times fresh) may fire before the frame that draws the burst; it must not draw the
    running refinement's card ahead of the reflection's (window.__seen, as in the restart test)."""
    context = browser.new_context()
    p = Page(context, base)
    p.open()
    seen = p.page.evaluate(
        """async () => {
        const { JobView } = await import('/studio/job.js');
        const hooks = { steering: false, announce() {}, fork: async () => {} };
        const view = new JobView(null, 'gen_burst', hooks);
        document.getElementById('branches').append(view.el);
        const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
        const send = (event, data) => view.onEvent({ id: null, event, data: JSON.stringify(data) });
        send('job.started', { attempt: 1 });
        send('stage.started', { iteration: 1, stage: 'plan', ts: 1 });
        send('stage.completed', { iteration: 1, stage: 'plan', seconds: 0.1, text: 'a plan' });
        await frame();
        window.__seen = [];
        send('stage.started', { iteration: 1, stage: 'reflect', ts: 2 });
        send('stage.completed', { iteration: 1, stage: 'reflect', seconds: 0.1, text: 'wrong', verdict: 'wrong' });
        send('stage.started', { iteration: 1, stage: 'refine', ts: 3 });
        view.tick(); // the clock, before the frame
        await frame();
        await frame();
        view.close();
        return window.__seen;
    }"""
    )
    assert seen == ["1:reflect", "1:refine"]
    p.check_clean()
    context.close()
