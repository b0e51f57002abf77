"""The studio's browser tests' helpers: a Playwright page on the studio that records what appeared
in which order and collects console errors and requests outside the app, the form values the tests
type, and a job's view over HTTP. (The `browser` fixture is in tests/service/api/conftest.py.)"""

from __future__ import annotations

import re

import httpx

from testkit.paths import ROOT

ARTIFACTS = ROOT / "artifacts"  # screenshots of the studio, for a person to look at

# What the tests type into the form: small and fast on the tiny model.
FAST = {"width": 64, "height": 64, "steps": 6, "iterations": 2, "seed": 3, "preview-every": 1}

# Records every stage card as it is added, and every image a card shows, before the page's own
# scripts run: the order in which things appeared, not just the end state.
RECORDER = """
window.__seen = []; window.__images = {};
new MutationObserver((records) => {
  for (const r of records) {
    for (const node of r.addedNodes) {
      if (node.nodeType === 1 && node.matches('li.stage')) window.__seen.push(
        node.dataset.iteration + ':' + node.dataset.stage);
    }
    if (r.type === 'attributes' && r.target.matches('li.stage img')) {
      const card = r.target.closest('li.stage');
      const key = card.dataset.iteration + ':' + card.dataset.stage;
      (window.__images[key] ||= []).push(r.target.alt);
    }
  }
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


class Page:
    """A Playwright page on the studio that collects console errors and outside requests."""

    def __init__(self, context, base: str):
        self.base = base
        self.page = context.new_page()
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.event_requests: list[dict[str, str]] = []
        self.page.add_init_script(RECORDER)
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", self._request)

    def _request(self, request) -> None:
        url = request.url
        if not (url.startswith(self.base) or url.startswith(("blob:", "data:"))):
            self.outside.append(url)
        if url.endswith("/events"):
            self.event_requests.append(request.headers)

    def open(self, path: str = "/") -> None:
        self.page.goto(self.base + path)
        self.page.wait_for_selector("#server:has-text('live')")

    def fill(self, prompt: str, values: dict[str, object]) -> None:
        self.page.fill("#prompt", prompt)
        self.page.click("details.advanced summary")
        for field, value in values.items():
            self.page.fill(f"#{field}", str(value))
        self.page.fill("#plan-tokens", "8")
        self.page.fill("#reflect-tokens", "8")

    def submit(self) -> str:
        self.page.click("#submit")
        self.page.wait_for_url(re.compile(r"job=gen_"))
        return self.page.url.split("job=")[1]

    def wait_status(self, status: str, timeout_s: float = 120) -> None:
        self.page.wait_for_selector(f".job[data-status={status}]", timeout=timeout_s * 1000)

    def check_clean(self, allowed: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.errors if not any(a in e for a in allowed)]
        assert not errors, errors
        assert not self.outside, self.outside


def job_view(base: str, job_id: str, key: str | None = None) -> dict:
    """GET /v1/generations/{job_id} (with the API key, when given)."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return httpx.get(f"{base}/v1/generations/{job_id}", headers=headers, timeout=5).json()
