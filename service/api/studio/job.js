// One generation on the page: a header (header.js: status, queue position, timings, actions) and
// a row per iteration with a card per stage, redrawn from state.js as its events stream in.
//
// The events come from fetch()-streamed SSE; when the stream drops, it resumes with Last-Event-ID.
// The state and the last event id are kept in sessionStorage, so a reload redraws at once and
// resumes from where it was; a shared link (no stored state) replays the events from the start.

import { describe } from "./api.js";
import { drawCard, makeCard } from "./cards.js";
import { h, saveBlob } from "./dom.js";
import { drawHeader } from "./header.js";
import { absorbView, newState, reduce, STAGE_LABEL, STAGES, STATUS_LABEL, TERMINAL } from "./state.js";
import { addPausedEditor, addSteering } from "./steer.js";

const RECONNECTING = "Connection lost; reconnecting…";

export class JobView {
  // hooks: {steering: bool, announce(text), fork(view, spec) -> Promise}
  constructor(api, id, hooks) {
    this.api = api;
    this.hooks = hooks;
    this.abort = new AbortController();
    this.state = newState(id);
    this.dirty = new Set();
    this.blobs = new Set();
    this.cards = new Map(); // "it:N:stage" -> card elements
    this.rows = new Map(); // N -> row elements
    this.lastSaved = 0;
    this.build();
  }

  get id() {
    return this.state.id;
  }

  build() {
    const id = this.state.id;
    this.status = h("span", { class: "status", "data-status": "queued", text: "Queued" });
    this.title = h("h3", { id: `title-${id}`, class: "job-title", text: id });
    this.meta = h("p", { class: "meta" });
    this.queue = h("p", { class: "queue", hidden: true });
    this.note = h("p", { class: "note", role: "status" });
    this.error = h("p", { class: "error", role: "alert" });
    this.timings = h("p", { class: "timings" });
    this.cancelButton = h("button", { type: "button", class: "cancel", text: "Cancel", onclick: () => this.cancel() });
    this.trajectoryButton = h("button", {
      type: "button",
      hidden: true,
      text: "Download trajectory",
      onclick: () => this.downloadTrajectory(),
    });
    this.linkButton = h("a", { href: `?job=${encodeURIComponent(id)}`, class: "link", text: "Link to this generation" });
    this.actions = h("div", { class: "actions" }, this.cancelButton, this.trajectoryButton, this.linkButton);
    this.steerSlot = h("div", { class: "steer-job" });
    this.inputImg = h("img", { alt: "The starting image" });
    this.input = h("figure", { class: "input-image", hidden: true }, this.inputImg, h("figcaption", { text: "Starting image" }));
    this.list = h("ol", { class: "iterations", "aria-label": "Iterations" });
    this.el = h(
      "article",
      { class: "job", "data-job": id, "aria-labelledby": `title-${id}` },
      h("header", { class: "job-head" }, this.title, this.status),
      this.meta,
      this.queue,
      this.note,
      this.error,
      this.actions,
      this.steerSlot,
      this.input,
      this.list,
      this.timings,
    );
  }

  // -- life -----------------------------------------------------------------------------------

  // Restore what this tab saw before (if anything), then read the job's view. False when the
  // job cannot be shown (unknown, expired, another key's); the error is on the card.
  async load() {
    this.complete = false; // this tab saw the whole job, up to its terminal event
    const saved = sessionStorage.getItem(`strokes.job.${this.id}`);
    if (saved) {
      try {
        this.state = { ...newState(this.id), ...JSON.parse(saved) };
        this.complete = TERMINAL.has(this.state.status);
        this.renderAll();
      } catch {
        sessionStorage.removeItem(`strokes.job.${this.id}`);
      }
    }
    try {
      // Stages come from the events (replayed from the start when this tab has none).
      absorbView(this.state, await this.api.get(`/v1/generations/${this.id}`, this.abort.signal), false);
    } catch (err) {
      if (err.name !== "AbortError") this.showError(describe(err));
      return false;
    }
    this.renderAll();
    return true;
  }

  // Follow the job to its end (at once when it had already ended and this tab saw all of it).
  async run() {
    this.ticker = setInterval(() => this.tick(), 1000);
    if (!this.complete) await this.follow();
  }

  close() {
    this.abort.abort();
    clearInterval(this.ticker);
    this.save(true);
    for (const url of this.blobs) URL.revokeObjectURL(url);
    this.blobs.clear();
    this.el.remove();
  }

  async follow() {
    let delay = 500;
    while (!this.abort.signal.aborted) {
      try {
        const path = `/v1/generations/${this.id}/events`;
        const how = await this.api.stream(
          path,
          this.state.lastEventId,
          this.abort.signal,
          (ev) => this.onEvent(ev),
          () => this.connected(),
        );
        delay = 500;
        if (how === "finished" || TERMINAL.has(this.state.status)) break;
      } catch (err) {
        if (this.abort.signal.aborted) return;
        if (err.status && err.status !== 503) {
          this.showError(describe(err));
          return;
        }
        this.state.note = RECONNECTING;
        this.mark("job");
      }
      if (TERMINAL.has(this.state.status)) break;
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 8000);
    }
    if (this.abort.signal.aborted) return;
    // The final word on status, timings and (when the event log has expired) the stages.
    try {
      absorbView(this.state, await this.api.get(`/v1/generations/${this.id}`, this.abort.signal));
    } catch (err) {
      if (err.name !== "AbortError") this.showError(describe(err));
    }
    this.renderAll();
    this.save(true);
  }

  connected() {
    if (this.state.note !== RECONNECTING) return;
    this.state.note = null;
    this.mark("job");
  }

  onEvent(ev) {
    if (ev.event === "error") {
      this.state.note = RECONNECTING;
      this.mark("job");
      return;
    }
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    const before = this.state.status;
    const changed = reduce(this.state, ev.event, data);
    if (ev.id) this.state.lastEventId = ev.id;
    for (const key of changed) this.mark(key);
    if (ev.event === "stage.started") {
      this.hooks.announce(`Iteration ${data.iteration}: ${STAGE_LABEL[data.stage] || data.stage} started.`);
    }
    if (before !== this.state.status && TERMINAL.has(this.state.status)) {
      this.hooks.announce(`Generation ${STATUS_LABEL[this.state.status].toLowerCase()}.`);
    }
  }

  mark(key) {
    this.dirty.add(key);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  flush() {
    this.frame = null;
    const dirty = this.dirty;
    this.dirty = new Set();
    if (dirty.has("all")) return this.renderAll(true);
    // Cards are created in the order of the job (iteration, then stage), whatever the order in
    // which their keys were marked.
    const order = (key) => {
      const [kind, n, stage] = key.split(":");
      return kind === "job" ? [-1, 0] : [Number(n), stage ? STAGES.indexOf(stage) : -1];
    };
    const keys = [...dirty].sort((a, b) => {
      const [x, y] = [order(a), order(b)];
      return x[0] - y[0] || x[1] - y[1];
    });
    for (const key of keys) {
      const [kind, n, stage] = key.split(":");
      if (kind === "job") this.renderHeader();
      else if (stage) this.renderStage(Number(n), stage);
      else this.renderRow(Number(n));
    }
    this.save(false);
  }

  save(now) {
    if (!now && performance.now() - this.lastSaved < 500) return;
    this.lastSaved = performance.now();
    try {
      sessionStorage.setItem(`strokes.job.${this.id}`, JSON.stringify(this.state));
    } catch {
      // storage full: the page still works, a reload replays the events from the server
    }
  }

  async pollQueue() {
    if (this.state.status !== "queued" || this.polling) return;
    this.polling = true;
    try {
      const job = await this.api.get(`/v1/generations/${this.id}`, this.abort.signal);
      if (this.state.status === "queued" && job.status === "queued") this.state.position = job.queue_position;
      this.renderHeader();
    } catch {
      // the next tick tries again
    } finally {
      this.polling = false;
    }
  }

  tick() {
    if (TERMINAL.has(this.state.status)) return clearInterval(this.ticker);
    if (this.state.status === "queued" && (this.ticks = (this.ticks || 0) + 1) % 2 === 0) this.pollQueue();
    this.renderHeader(); // the running (or waiting) clock moves on
    // Only the running clocks of cards already drawn: a card is created by flush() alone, in the
    // pipeline's order. (A stage whose events arrived in the same burst as an earlier stage's,
    // e.g. after a reconnect, would otherwise get its card from here first, before the earlier
    // stage's card, which flush() then inserts ahead of it.)
    for (const it of Object.values(this.state.iterations)) {
      for (const s of Object.values(it.stages)) {
        if (s.status === "running" && this.cards.has(`it:${it.n}:${s.stage}`)) this.renderStage(it.n, s.stage);
      }
    }
  }

  // -- actions --------------------------------------------------------------------------------

  async cancel() {
    this.cancelButton.disabled = true;
    try {
      await this.api.del(`/v1/generations/${this.id}`);
      this.state.note = "Cancel requested: the job stops at its next step.";
    } catch (err) {
      this.cancelButton.disabled = false;
      this.showError(describe(err));
    }
    this.renderHeader();
  }

  async downloadTrajectory() {
    try {
      saveBlob(await this.api.blob(`/v1/generations/${this.id}/trajectory`), `${this.id}-trajectory.json`);
    } catch (err) {
      this.showError(describe(err));
    }
  }

  async downloadImage(ref) {
    try {
      saveBlob(await this.api.blob(ref.url), `${this.id}-${ref.id}.png`);
    } catch (err) {
      this.showError(describe(err));
    }
  }

  showError(message) {
    this.error.textContent = message;
  }

  // -- drawing --------------------------------------------------------------------------------

  // Draw everything; `reset` drops the cards first (a new attempt starts the stages over).
  renderAll(reset = false) {
    if (reset) {
      this.list.replaceChildren();
      this.rows.clear();
      this.cards.clear();
    }
    this.renderHeader();
    const order = Object.keys(this.state.iterations).map(Number).sort((a, b) => a - b);
    for (const n of order) {
      this.renderRow(n);
      for (const stage of STAGES) if (this.state.iterations[n].stages[stage]) this.renderStage(n, stage);
    }
  }

  renderHeader() {
    drawHeader(this);
  }

  renderRow(n) {
    let row = this.rows.get(n);
    if (!row) {
      const verdict = h("span", { class: "verdict-summary" });
      const stages = h("ol", { class: "stages" });
      const li = h("li", { class: "iteration", "data-iteration": n }, h("h4", { text: `Iteration ${n} ` }, verdict), stages);
      const next = [...this.rows.keys()].filter((k) => k > n).sort((a, b) => a - b)[0];
      this.list.insertBefore(li, next != null ? this.rows.get(next).li : null);
      row = { li, verdict, stages };
      this.rows.set(n, row);
    }
    const verdict = this.state.iterations[n]?.verdict;
    row.verdict.textContent = verdict ? `verdict: ${verdict}` : "";
    return row;
  }

  card(n, stage) {
    const key = `it:${n}:${stage}`;
    let card = this.cards.get(key);
    if (card) return card;
    const row = this.renderRow(n);
    card = makeCard(n, stage);
    const after = STAGES.slice(STAGES.indexOf(stage) + 1).map((s) => this.cards.get(`it:${n}:${s}`)).find(Boolean);
    row.stages.insertBefore(card.li, after ? after.li : null);
    this.cards.set(key, card);
    return card;
  }

  renderStage(n, stage) {
    const s = this.state.iterations[n]?.stages[stage];
    if (!s) return;
    const card = this.card(n, stage);
    drawCard(card, s, {
      finalId: this.state.finalImage?.id,
      loadImage: (img, ref) => this.loadImage(img, ref),
      download: (ref) => this.downloadImage(ref),
    });
    const paused = this.state.paused;
    if (paused && paused.iteration === n && paused.stage === stage) {
      if (card.steer.dataset.mode !== "paused") addPausedEditor(this, card.steer, paused);
    } else if (card.steer.dataset.mode === "paused") {
      card.steer.replaceChildren();
      delete card.steer.dataset.mode;
    }
    if (this.hooks.steering && s.status === "done" && !card.steer.dataset.mode && (stage === "plan" || stage === "reflect")) {
      addSteering(this, card.steer, s);
    }
  }

  // Images need the API key, so they are fetched and shown from blob: URLs. Only the newest
  // wanted image of an <img> is shown (previews arrive faster than they may load).
  async loadImage(img, ref) {
    if (img.dataset.want === ref.url) return;
    img.dataset.want = ref.url;
    let blob;
    try {
      blob = await this.api.blob(ref.url, this.abort.signal);
    } catch (err) {
      if (err.name !== "AbortError" && img.dataset.want === ref.url) img.alt += ` (${describe(err)})`;
      return;
    }
    if (img.dataset.want !== ref.url || this.abort.signal.aborted) return;
    const url = URL.createObjectURL(blob);
    this.blobs.add(url);
    const old = img.dataset.blob;
    img.src = url;
    img.dataset.blob = url;
    img.dataset.image = ref.id;
    if (old) {
      URL.revokeObjectURL(old);
      this.blobs.delete(old);
    }
  }
}
