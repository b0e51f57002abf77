// A stage card: built once per (iteration, stage), then redrawn from the stage's state. Text
// stages show a plan as instruction and scene, a reflection with its verdict badge and the
// corrective instruction highlighted; image stages show the newest preview or the image, with a
// progress bar of denoising steps.

import { h, seconds } from "./dom.js";
import { parsePlan, STAGE_LABEL, splitReflection } from "./state.js";

export function makeCard(n, stage) {
  const label = `${STAGE_LABEL[stage]}, iteration ${n}`;
  const card = { time: h("span", { class: "time" }), steer: h("div", { class: "steer" }) };
  card.lineage = h("span", { class: "lineage", hidden: true });
  const head = h("div", { class: "stage-head" }, h("h5", { text: STAGE_LABEL[stage] || stage }), card.lineage, card.time);
  const body = [];
  if (stage === "plan" || stage === "reflect" || stage === "instruction") {
    card.badge = h("span", { class: "badge", hidden: true });
    card.ins = h("dd", { class: "ins" });
    card.des = h("dd", { class: "des" });
    card.parts = h("dl", { class: "plan-parts", hidden: true }, h("dt", { text: "Instruction" }), card.ins, h("dt", { text: "Scene" }), card.des);
    card.raw = h("p", { class: "raw" });
    card.text = h("div", { class: "text", "aria-live": "polite", "aria-label": label }, card.parts, card.raw);
    body.push(card.badge, card.text);
  } else {
    card.img = h("img", { alt: `${label}: not drawn yet`, hidden: true });
    card.progress = h("progress", { max: 1, value: 0, "aria-label": `${label}: denoising progress` });
    card.caption = h("figcaption", { "aria-live": "polite" });
    card.download = h("button", { type: "button", class: "download", hidden: true, text: "Download image" });
    body.push(h("figure", {}, h("div", { class: "frame" }, card.img), card.progress, card.caption), card.download);
  }
  card.li = h("li", { class: "stage", "data-stage": stage, "data-iteration": n }, head, ...body, card.steer);
  return card;
}

// io: {finalId, loadImage(img, ref), download(ref)}
export function drawCard(card, s, io) {
  card.li.dataset.status = s.status;
  // A fork's stages up to the fork point are its parent's, replayed; an edited one holds the
  // person's words.
  card.li.classList.toggle("inherited", s.inherited && !s.edited);
  card.lineage.hidden = !(s.inherited || s.edited);
  card.lineage.textContent = s.edited ? "your edit" : s.inherited ? "inherited" : "";
  const elapsed = s.startedTs ? Math.max(0, Date.now() / 1000 - s.startedTs) : null;
  card.time.textContent =
    s.seconds != null ? seconds(s.seconds) : s.status === "running" ? `running${elapsed != null ? ` · ${Math.floor(elapsed)} s` : "…"}` : s.status;
  if (card.text) drawText(card, s);
  else drawImage(card, s, io);
}

function drawText(card, s) {
  card.text.setAttribute("aria-busy", s.status === "running" ? "true" : "false");
  if (s.stage === "instruction") {
    card.parts.hidden = true;
    card.raw.textContent = s.text;
    return;
  }
  if (s.stage === "plan") {
    const plan = parsePlan(s.text);
    const tagged = plan.ins != null || plan.des != null;
    card.parts.hidden = !tagged;
    card.ins.textContent = plan.ins ?? "";
    card.des.textContent = plan.des ?? "";
    card.raw.textContent = tagged ? plan.rest : s.text;
    return;
  }
  const parts = splitReflection(s.text);
  card.raw.replaceChildren(
    ...parts.map((p) => (p.corrective ? h("mark", { class: "corrective", title: "corrective instruction", text: p.text }) : p.text)),
  );
  if (s.instruction && !parts.some((p) => p.corrective)) {
    card.raw.append(h("span", { class: "corrective-label", text: " Corrective instruction: " }), h("mark", { class: "corrective", text: s.instruction }));
  }
  card.badge.hidden = !s.verdict;
  card.badge.textContent = s.verdict ? `Verdict: ${s.verdict}` : "";
  card.badge.dataset.verdict = s.verdict || "";
}

function drawImage(card, s, io) {
  const label = `${STAGE_LABEL[s.stage]}, iteration ${s.iteration}`;
  card.progress.max = s.steps || 1;
  card.progress.value = s.status === "done" ? s.steps || 1 : s.step || 0;
  card.progress.hidden = s.status === "done";
  card.caption.textContent =
    s.status === "done" ? "" : s.steps ? `denoising step ${s.step} of ${s.steps}` : s.status === "running" ? "starting…" : "";
  const ref = s.image || s.preview;
  if (ref) {
    card.img.hidden = false;
    card.img.width = ref.width;
    card.img.height = ref.height;
    card.img.alt = s.image ? `${label}: the image` : `${label}: preview at step ${s.step} of ${s.steps}`;
    io.loadImage(card.img, ref);
  }
  const isFinal = Boolean(s.image && io.finalId === s.image.id);
  card.li.classList.toggle("final", isFinal);
  if (s.image) {
    card.download.hidden = false;
    card.download.onclick = () => io.download(s.image);
    card.download.textContent = isFinal ? "Download final image" : "Download image";
  }
}
