// The header of one generation: its prompt, status, facts (size, seed, branch of), queue position,
// note, error, timings (live while the job runs) and which actions apply; drawn from the view's
// state (state.js).

import { seconds } from "./dom.js";
import { STATUS_LABEL, TERMINAL } from "./state.js";
import { addSteering } from "./steer.js";

export function drawHeader(view) {
  const s = view.state;
  const r = s.request || {};
  view.title.textContent = r.prompt || s.id;
  view.status.textContent = STATUS_LABEL[s.status] || s.status;
  view.status.dataset.status = s.status;
  view.el.dataset.status = s.status;
  const facts = [s.id, r.protocol, r.width && `${r.width}×${r.height}`, r.max_iterations && `≤ ${r.max_iterations} iterations`];
  if (r.seed != null) facts.push(`seed ${r.seed}`);
  if (r.input_image) facts.push("from a starting image");
  view.meta.textContent = facts.filter(Boolean).join(" · ");
  if (s.inputImage) {
    view.input.hidden = false;
    view.loadImage(view.inputImg, s.inputImage);
  }
  view.queue.hidden = s.status !== "queued";
  view.queue.textContent = s.position ? `Waiting in the queue: position ${s.position}.` : "Waiting for a worker…";
  view.note.textContent = s.note || "";
  if (s.error) view.error.textContent = `The generation failed: ${s.error.message}`;
  view.cancelButton.hidden = TERMINAL.has(s.status);
  view.trajectoryButton.hidden = s.status !== "succeeded";
  const live = liveTimings(s);
  const t = { ...(s.timings || {}), ...live };
  const clock = (name) => (name in live ? `${t[name]} s` : seconds(t[name])); // live: whole seconds
  const parts = [
    t.queued_s != null && `queued ${clock("queued_s")}`,
    t.run_s != null && `${TERMINAL.has(s.status) ? "ran" : "running for"} ${clock("run_s")}`,
    t.total_s != null && `total ${seconds(t.total_s)}`,
    s.usage?.generated_tokens != null && `${s.usage.generated_tokens} tokens generated`,
  ].filter(Boolean);
  view.timings.textContent = parts.length ? `Timings: ${parts.join(" · ")}` : "";
  if (s.parent) {
    const p = s.parent;
    view.meta.textContent += ` · branch of ${p.job_id}${p.iteration ? ` after iteration ${p.iteration} ${p.stage}` : ""}`;
  }
  if (view.hooks.steering && s.status === "succeeded" && !view.steerSlot.childElementCount) {
    addSteering(view, view.steerSlot, null);
  }
}

// While the job is not over, its clocks are the page's: the view's figures were right only when
// it was read (the view redraws the header every second: job.js tick()).
function liveTimings(s) {
  const now = Date.now() / 1000;
  if (s.status === "running" && s.startedAt != null) return { run_s: Math.max(0, Math.floor(now - s.startedAt)) };
  if (s.status === "queued" && s.startedAt == null && s.createdAt != null) {
    return { queued_s: Math.max(0, Math.floor(now - s.createdAt)) };
  }
  return {};
}
