// The studio page: server info and defaults, the API key, the form (with a dropped starting
// image), the job views side by side (a fork opens beside its parent), the gallery, and the URL
// (?job=ID) that reopens or shares what is on screen.

import { Api, ApiError, describe, fieldMessage } from "./api.js";
import { h } from "./dom.js";
import { JobView } from "./job.js";

const api = new Api();
const $ = (id) => document.getElementById(id);
const RECENT = "strokes.recent";
const GALLERY_PAGE = 12;
let info = null;
let views = []; // JobViews on screen, left to right
let inputImage = null; // data: URL of the dropped starting image

// The form's fields: element id -> how its value goes into the request (and which `param` of a
// 422 names it: errors.py reports the dotted path of the field, e.g. "draft.steps").
const FIELDS = {
  prompt: { params: ["prompt"] },
  image: { params: ["input_image"] },
  width: { params: ["width"] },
  height: { params: ["height"] },
  steps: { params: ["draft.steps", "refine.steps", "draft", "refine"] },
  iterations: { params: ["max_iterations"] },
  seed: { params: ["seed"] },
  protocol: { params: ["protocol"] },
  "preview-every": { params: ["preview_every"] },
  "plan-tokens": { params: ["plan.max_tokens", "plan"] },
  "reflect-tokens": { params: ["reflect.max_tokens", "reflect"] },
  "pause-after": { params: ["pause_after"] },
};

const announce = (text) => {
  $("announcer").textContent = text;
};

// A number field as sent: a number when it reads as one, else the raw text (the server names
// what is wrong with it).
function num(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  return Number.isFinite(value) ? value : raw;
}

function requestBody() {
  const steps = num("steps");
  const body = {
    prompt: $("prompt").value,
    protocol: $("protocol").value,
    width: num("width"),
    height: num("height"),
    max_iterations: num("iterations"),
    draft: { steps },
    refine: { steps },
    plan: { max_tokens: num("plan-tokens") },
    reflect: { max_tokens: num("reflect-tokens") },
    preview_every: num("preview-every"),
    seed: num("seed"),
  };
  if (inputImage) body.input_image = inputImage;
  const pauses = [...document.querySelectorAll("input[name=pause]:checked")].map((el) => el.value);
  if (info?.features.steering && pauses.length) body.pause_after = pauses;
  return JSON.parse(JSON.stringify(body)); // drops the undefined (empty) fields: server defaults
}

function clearErrors() {
  for (const id of Object.keys(FIELDS)) {
    $(id).removeAttribute("aria-invalid");
    $(`${id}-error`).textContent = "";
  }
  $("form-error").textContent = "";
}

const fieldOf = (param) => Object.keys(FIELDS).find((key) => FIELDS[key].params.some((p) => param === p || param.startsWith(`${p}.`)));

// Every field the server names is marked at the field, with its own message (a request with
// several bad fields is answered with all of them: errors.py); what no field shows goes below.
function showError(err) {
  if (err instanceof ApiError && err.fields.length) {
    const marked = new Set();
    const rest = [];
    for (const field of err.fields) {
      const id = fieldOf(field.param);
      if (!id) {
        rest.push(field.message);
      } else if (!marked.has(id)) {  // draft.steps and refine.steps are one field here
        $(`${id}-error`).textContent = fieldMessage(field);
        $(id).setAttribute("aria-invalid", "true");
        marked.add(id);
      }
    }
    if (marked.size) {
      $([...marked][0]).focus();
      const which = marked.size > 1 ? `the ${marked.size} fields marked above` : "the field marked above";
      $("form-error").textContent = [`Please correct ${which}.`, ...rest].join(" ");
      return;
    }
  }
  if (err instanceof ApiError && err.status === 401) showKeyPanel(true);
  $("form-error").textContent = describe(err);
}

function fillDefaults() {
  const d = info.defaults;
  $("width").value = d.width;
  $("height").value = d.height;
  $("steps").value = d.steps;
  $("iterations").value = d.max_iterations;
  $("protocol").value = d.protocol;
  $("preview-every").value = d.preview_every;
  $("plan-tokens").value = d.plan_max_tokens;
  $("reflect-tokens").value = d.reflect_max_tokens;
  $("seed").value = "";
}

function applyLimits() {
  const l = info.limits;
  for (const id of ["width", "height"]) Object.assign($(id), { min: l.min_side, max: l.max_side, step: l.size_multiple });
  Object.assign($("steps"), { min: l.min_steps, max: l.max_steps });
  Object.assign($("iterations"), { min: 1, max: l.max_iterations });
  $("prompt").maxLength = l.max_prompt_chars;
}

async function loadInfo() {
  try {
    info = await api.get("/v1/info");
  } catch (err) {
    $("server").textContent = `The service is not answering: ${describe(err)}`;
    return false;
  }
  const workers = info.workers;
  $("server").textContent = workers.length
    ? `${workers.length} worker${workers.length > 1 ? "s" : ""} live on ${[...new Set(workers.map((w) => w.device))].join(", ")}`
    : "No worker is live right now: new generations wait in the queue.";
  applyLimits();
  fillDefaults();
  $("pause-after").hidden = !info.features.steering;
  $("key-button").hidden = !info.auth_required;
  if (info.auth_required && !api.key) showKeyPanel(true);
  return true;
}

function showKeyPanel(show) {
  $("key-panel").hidden = !show;
  $("key-button").setAttribute("aria-expanded", String(show));
  if (show) $("api-key").focus();
}

// -- the starting image ---------------------------------------------------------------------------

function takeImage(file) {
  $("image-error").textContent = "";
  if (!file) return;
  if (!/^image\/(png|jpeg|webp)$/.test(file.type)) {
    $("image-error").textContent = "Choose a PNG, JPEG or WebP image.";
    return;
  }
  const limit = info ? info.limits.max_body_bytes * 0.7 : Infinity; // base64 adds a third
  if (file.size > limit) {
    $("image-error").textContent = `The image is too large (${(file.size / 1e6).toFixed(1)} MB; at most ${(limit / 1e6).toFixed(1)} MB).`;
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    inputImage = reader.result;
    $("image-thumb").src = inputImage;
    $("image-preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  inputImage = null;
  $("image").value = "";
  $("image-preview").hidden = true;
  $("image-thumb").removeAttribute("src");
}

// -- jobs on screen -------------------------------------------------------------------------------

const hooks = {
  get steering() {
    return Boolean(info?.features.steering);
  },
  announce,
  fork: forkFrom,
};

function remember(id) {
  const ids = JSON.parse(localStorage.getItem(RECENT) || "[]").filter((x) => x !== id);
  localStorage.setItem(RECENT, JSON.stringify([id, ...ids].slice(0, 30)));
}

function setUrl(id, push) {
  const url = new URL(location.href);
  url.searchParams.set("job", id);
  if (url.href !== location.href) history[push ? "pushState" : "replaceState"]({ job: id }, "", url);
}

function place(view, after) {
  const branches = $("branches");
  if (after && after.el.isConnected) after.el.after(view.el);
  else branches.append(view.el);
  $("job-empty").hidden = true;
}

async function openJob(id, { push = false } = {}) {
  for (const view of views) view.close();
  views = [];
  setUrl(id, push);
  const view = new JobView(api, id, hooks);
  views.push(view);
  place(view);
  if (!(await view.load())) return;
  const parent = view.state.parent;
  if (parent && parent.job_id) {
    const left = new JobView(api, parent.job_id, hooks);
    views.unshift(left);
    view.el.before(left.el);
    left.load().then((ok) => ok && left.run());
  }
  await view.run();
  refreshGallery();
}

// A new branch from `view`'s job. A fork runs with its parent's request and actual seed, so the
// body carries only the fork point (and the previews this page wants); any other generation
// field next to `fork` is a 422.
async function forkFrom(view, fork) {
  const body = { fork };
  const previews = view.state.request?.preview_every;
  if (previews != null) body.preview_every = previews;
  const job = await api.post("/v1/generations", body);
  remember(job.id);
  const child = new JobView(api, job.id, hooks);
  views.push(child);
  place(child, view);
  setUrl(job.id, true);
  child.el.scrollIntoView({ behavior: "smooth", inline: "start", block: "nearest" });
  announce("The new branch started beside the old one.");
  if (await child.load()) child.run().then(refreshGallery);
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("submit");
  button.disabled = true;
  try {
    const job = await api.post("/v1/generations", requestBody());
    remember(job.id);
    announce("Generation submitted.");
    $("job").focus();
    openJob(job.id, { push: true });
    refreshGallery();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// -- gallery --------------------------------------------------------------------------------------

// One page of the caller's jobs, newest first (GET /v1/generations), from `after` on; on a server
// without the job list, the jobs this browser started. -> {jobs, next}
async function listJobs(after) {
  if (info?.features.job_list) {
    try {
      const query = new URLSearchParams({ limit: String(GALLERY_PAGE) });
      if (after) query.set("after", after);
      const page = await api.get(`/v1/generations?${query}`);
      $("gallery-note").textContent = "";
      return { jobs: page.data, next: page.has_more ? page.next_cursor : null };
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 405)) throw err;
    }
  }
  $("gallery-note").textContent = "This service does not list generations; showing those started from this browser.";
  const ids = JSON.parse(localStorage.getItem(RECENT) || "[]");
  const jobs = await Promise.all(ids.map((id) => api.get(`/v1/generations/${id}`).catch(() => null)));
  const alive = jobs.filter(Boolean);
  localStorage.setItem(RECENT, JSON.stringify(alive.map((job) => job.id)));
  return { jobs: alive, next: null };
}

let galleryBusy = null;
let galleryNext = null; // next_cursor of the last page shown, while there are more

// `more`: append the next page; else show the first page again.
async function refreshGallery(more = false) {
  if (info?.auth_required && !api.key) {
    $("gallery-note").textContent = "Enter the API key to see your generations.";
    return;
  }
  if (galleryBusy) return galleryBusy;
  galleryBusy = (async () => {
    try {
      const { jobs, next } = await listJobs(more === true ? galleryNext : null);
      const list = $("gallery-list");
      if (more !== true) {
        for (const img of list.querySelectorAll("img[src^='blob:']")) URL.revokeObjectURL(img.src);
        list.replaceChildren();
      }
      list.append(...jobs.map(galleryItem));
      galleryNext = next;
      $("gallery-more").hidden = !next;
      if (!list.childElementCount) $("gallery-note").textContent ||= "No generations yet.";
    } catch (err) {
      $("gallery-note").textContent = describe(err);
    } finally {
      galleryBusy = null;
    }
  })();
  return galleryBusy;
}

function galleryItem(job) {
  const prompt = job.request?.prompt || job.id;
  const when = new Date(job.created_at * 1000).toLocaleString();
  const img = h("img", { alt: "", width: 96, height: 96 });
  const ref = job.final_image || job.images?.[job.images.length - 1];
  if (ref) {
    api.blob(ref.url).then(
      (blob) => {
        img.src = URL.createObjectURL(blob);
      },
      () => img.remove(),
    );
  }
  const button = h(
    "button",
    { type: "button", class: "gallery-item", "data-job": job.id, "aria-label": `Open “${prompt}”${job.parent ? ", a branch" : ""}, ${job.status}, ${when}`, onclick: () => openJob(job.id, { push: true }) },
    h("span", { class: "thumb" }, ref ? img : null),
    h("span", { class: "gallery-prompt", text: prompt }),
    h("span", { class: "gallery-status", "data-status": job.status, text: job.status }),
    job.parent ? h("span", { class: "gallery-branch", text: "a branch" }) : null,
  );
  return h("li", {}, button);
}

// -- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("gen-form").addEventListener("submit", submit);
  $("defaults").addEventListener("click", () => info && fillDefaults());
  $("image").addEventListener("change", () => takeImage($("image").files[0]));
  $("image-clear").addEventListener("click", clearImage);
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    takeImage(event.dataTransfer.files[0]);
  });
  $("key-button").addEventListener("click", () => showKeyPanel($("key-panel").hidden));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      $("key-error").textContent = "Enter the key.";
      return;
    }
    api.setKey(key);
    $("api-key").value = "";
    $("key-error").textContent = "";
    showKeyPanel(false);
    announce("API key saved in this browser.");
    refreshGallery();
    const id = new URL(location.href).searchParams.get("job");
    if (id && !views.length) openJob(id);
  });
  $("key-forget").addEventListener("click", () => {
    api.setKey("");
    announce("API key forgotten.");
  });
  $("gallery-refresh").addEventListener("click", () => refreshGallery());
  $("gallery-more").addEventListener("click", () => refreshGallery(true));
  window.addEventListener("popstate", () => {
    const id = new URL(location.href).searchParams.get("job");
    if (id) openJob(id);
  });
}

async function main() {
  wire();
  if (!(await loadInfo())) return;
  const id = new URL(location.href).searchParams.get("job");
  if (info.auth_required && !api.key) return;
  refreshGallery();
  if (id) openJob(id);
}

main();
