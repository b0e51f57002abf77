// The header of one generation: its prompt, status, facts (size, seed, branch of), queue position,
// note, error, timings and which actions apply; drawn from the view's state (state.js).

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
  const t = s.timings || {};
  const parts = [
    t.queued_s != null && `queued ${seconds(t.queued_s)}`,
    t.run_s != null && `ran ${seconds(t.run_s)}`,
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
