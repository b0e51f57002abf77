// Steering, where the server has it (GET /v1/info features.steering): from a finished stage, fork
// a new branch with the person's words (edit the plan, overrule the verdict, write the corrective
// instruction), or continue after the final image with a follow-up instruction; and, when a job
// paused after a stage (pause_after), edit that stage's text and continue.
//
// The contract: POST /v1/generations with `fork: {job_id, iteration, stage, text?}` or
// `fork: {job_id, instruction}`; POST /v1/generations/{id}/continue with `{text?}`.

import { describe } from "./api.js";
import { h } from "./dom.js";

const CORRECT = "The intermediate step is correct.";
const wrong = (instruction) => `The intermediate step is wrong. The corrective instruction is: <refine>${instruction}</refine>`;

let uid = 0;

function editor(view, slot, { label, value, submitText, onSubmit, extra }) {
  const id = `steer-${view.id}-${++uid}`;
  const area = h("textarea", { id, rows: 3, "aria-describedby": `${id}-error` });
  area.value = value;
  const message = h("p", { id: `${id}-error`, class: "field-error", role: "alert" });
  const form = h(
    "form",
    { class: "steer-form" },
    extra || null,
    h("label", { for: id, text: label }),
    area,
    h("div", { class: "actions" }, h("button", { type: "submit", text: submitText }), h("button", { type: "button", text: "Close", onclick: () => form.remove() })),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    message.textContent = "";
    area.removeAttribute("aria-invalid");
    try {
      await onSubmit(area.value, form);
      form.remove();
    } catch (err) {
      // A 422 names the field (fork.text, fork.instruction, text): it is this editor's text.
      message.textContent = describe(err);
      if (err.status === 422) area.setAttribute("aria-invalid", "true");
      area.focus();
      button.disabled = false;
    }
  });
  slot.append(form);
  area.focus();
  return form;
}

// Buttons on a finished plan or reflection (stage state `s`), or on the finished job (s = null).
export function addSteering(view, slot, s) {
  slot.dataset.mode = "steer";
  const fork = (spec) => view.hooks.fork(view, { job_id: view.id, ...spec });
  const open = (make) => () => {
    if (!slot.querySelector("form")) make();
  };
  if (s === null) {
    slot.append(
      h("button", {
        type: "button",
        text: "Continue with an instruction…",
        onclick: open(() =>
          editor(view, slot, {
            label: "What should change next?",
            value: "",
            submitText: "Start the new branch",
            onSubmit: (text) => fork({ instruction: text }),
          }),
        ),
      }),
    );
    return;
  }
  const at = { iteration: s.iteration, stage: s.stage };
  if (s.stage === "plan") {
    slot.append(
      h("button", {
        type: "button",
        text: "Edit this plan…",
        onclick: open(() =>
          editor(view, slot, {
            label: `Your plan for iteration ${s.iteration}`,
            value: s.text,
            submitText: "Fork from here",
            onSubmit: (text) => fork({ ...at, text }),
          }),
        ),
      }),
    );
    return;
  }
  const overrule = s.verdict === "correct" ? "Call it wrong…" : "Call it correct";
  slot.append(
    h("button", {
      type: "button",
      text: overrule,
      onclick: () => {
        if (s.verdict === "correct") {
          open(() =>
            editor(view, slot, {
              label: "The corrective instruction",
              value: "",
              submitText: "Fork from here",
              onSubmit: (text) => fork({ ...at, text: wrong(text) }),
            }),
          )();
        } else {
          fork({ ...at, text: CORRECT }).catch((err) => view.showError(describe(err)));
        }
      },
    }),
    h("button", {
      type: "button",
      text: "Write the corrective instruction…",
      onclick: open(() =>
        editor(view, slot, {
          label: "The corrective instruction",
          value: s.instruction || "",
          submitText: "Fork from here",
          onSubmit: (text) => fork({ ...at, text: wrong(text) }),
        }),
      ),
    }),
  );
}

// The job waits after a stage (pause_after): edit its text, or continue unchanged.
export function addPausedEditor(view, slot, paused) {
  slot.replaceChildren();
  slot.dataset.mode = "paused";
  const until = paused.expires_at ? ` (until ${new Date(paused.expires_at * 1000).toLocaleTimeString()})` : "";
  const path = `/v1/generations/${view.id}/continue`;
  editor(view, slot, {
    label: `The job is waiting${until}: edit the ${paused.stage === "plan" ? "plan" : "reflection"} or continue`,
    value: paused.text,
    submitText: "Continue with this text",
    onSubmit: (text) => view.api.post(path, text === paused.text ? {} : { text }),
    extra: h("button", {
      type: "button",
      text: "Continue unchanged",
      onclick: () => view.api.post(path, {}).catch((err) => view.showError(describe(err))),
    }),
  });
}
