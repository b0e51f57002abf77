// A generation as the page knows it, built from its SSE events (or, when they have expired, from
// the job's view). Pure data: no DOM. reduce() applies one event and says what changed, so the
// view redraws only that ("job" for the header, "it:N:stage" for one stage card).

// A follow-up fork's iteration opens with the person's instruction (stage "instruction").
export const STAGES = ["instruction", "plan", "draft", "reflect", "refine"];
export const STATUS_LABEL = {
  queued: "Queued",
  running: "Running",
  paused: "Waiting for you",
  succeeded: "Finished",
  failed: "Failed",
  canceled: "Canceled",
};

export const STAGE_LABEL = { instruction: "Instruction", plan: "Plan", draft: "Draft", reflect: "Reflection", refine: "Refinement" };
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export function newState(id) {
  return {
    id,
    status: "queued",
    attempt: 0,
    position: null,
    request: null,
    createdAt: null,
    startedAt: null, // when its first attempt started (server clock, Unix seconds): the live "ran" clock
    parent: null,
    inputImage: null, // the starting image's link, when the request had one
    iterations: {}, // n -> {n, verdict, stages: {plan: Stage, ...}}
    finalImage: null,
    timings: null,
    usage: null,
    error: null,
    note: null, // a line about the job's life: handed back, taken over, reconnecting
    paused: null, // {iteration, stage, text, expires_at} while the job waits for the person
    resumed: false, // continued after a pause: the next attempt replays the stages so far
    lastEventId: null,
  };
}

function stageOf(state, iteration, stage) {
  const it = (state.iterations[iteration] ||= { n: iteration, verdict: null, stages: {} });
  return (it.stages[stage] ||= {
    stage,
    iteration,
    status: "running",
    text: "",
    startedTs: null,
    seconds: null,
    verdict: null,
    instruction: null,
    inherited: false, // replayed from the parent (a fork) or from before a pause, not computed anew
    edited: false, // the person's words replaced this stage's text
    image: null,
    preview: null,
    step: 0,
    steps: 0,
  });
}

// Apply one event (name, data) to the state; returns the set of changed keys.
export function reduce(state, name, d) {
  const changed = new Set(["job"]);
  const key = () => `it:${d.iteration}:${d.stage}`;
  switch (name) {
    case "job.queued":
      state.status = "queued";
      if (d.position != null) state.position = d.position;
      if (d.reason) state.note = `Back in the queue (${d.reason.replaceAll("_", " ")}).`;
      break;
    case "job.started":
      if (d.attempt !== state.attempt && Object.keys(state.iterations).length) {
        // A new attempt runs the pipeline again (a continued pause replays the stages so far).
        state.iterations = {};
        changed.add("all");
        if (state.resumed) state.note = null;
        else state.note = d.takeover ? "Another worker took the job over and started again." : "The job started again.";
      }
      state.resumed = false;
      state.status = "running";
      state.startedAt ??= d.ts ?? null;
      state.attempt = d.attempt;
      state.position = null;
      break;
    case "stage.started": {
      const s = stageOf(state, d.iteration, d.stage);
      Object.assign(s, { status: "running", text: "", startedTs: d.ts ?? null, seconds: null });
      state.status = "running";
      changed.add(key());
      break;
    }
    case "text.delta":
      stageOf(state, d.iteration, d.stage).text += d.delta;
      changed.add(key());
      break;
    case "image.progress": {
      const s = stageOf(state, d.iteration, d.stage);
      s.step = d.step;
      s.steps = d.steps;
      if (d.preview) s.preview = d.preview;
      changed.add(key());
      break;
    }
    case "stage.completed": {
      const s = stageOf(state, d.iteration, d.stage);
      const fork = state.request?.fork;
      Object.assign(s, {
        status: "done",
        seconds: d.seconds ?? null,
        verdict: d.verdict ?? null,
        instruction: d.refine_instruction ?? null,
        image: d.image ?? null,
        // Replayed stages of a fork are its parent's; those a resumed pause replays are the
        // job's own. The fork point's stage holds the person's words when the fork gave `text`.
        inherited: Boolean(d.inherited && (state.parent || fork)),
        edited: Boolean(fork && fork.text != null && fork.iteration === d.iteration && fork.stage === d.stage),
      });
      if (d.text != null) s.text = d.text;
      else if (d.instruction != null) s.text = d.instruction;
      if (d.steps) s.step = s.steps = d.steps;
      changed.add(key());
      break;
    }
    case "iteration.completed":
      stageOf(state, d.iteration, "plan"); // the row exists even if its events expired
      state.iterations[d.iteration].verdict = d.verdict ?? null;
      changed.add(`it:${d.iteration}`);
      break;
    case "job.paused":
      state.status = "paused";
      state.paused = { iteration: d.iteration, stage: d.stage, text: d.text ?? "", expires_at: d.expires_at };
      changed.add(`it:${d.iteration}:${d.stage}`);
      break;
    case "job.resumed":
      if (state.paused) changed.add(`it:${state.paused.iteration}:${state.paused.stage}`);
      state.status = "queued";
      state.paused = null;
      state.resumed = true;
      state.note = "Continued: back in the queue.";
      break;
    case "job.completed":
      state.status = "succeeded";
      state.finalImage = d.final_image ?? null;
      state.timings = d.timings ?? null;
      state.usage = d.usage ?? null;
      state.note = null;
      break;
    case "job.failed":
      state.status = "failed";
      state.error = d.error ?? { type: "failed", message: "the generation failed" };
      break;
    case "job.canceled":
      state.status = "canceled";
      break;
    default:
      break; // unknown events (a newer server) are ignored
  }
  if (TERMINAL.has(state.status)) {
    state.paused = null;
    for (const it of Object.values(state.iterations)) {
      for (const s of Object.values(it.stages)) {
        if (s.status === "running") {
          s.status = state.status === "succeeded" ? "done" : "stopped";
          changed.add(`it:${it.n}:${s.stage}`);
        }
      }
    }
  }
  return changed;
}

// The job's view (GET /v1/generations/{id}) into the state: header fields always; with `stages`,
// also the stages from the view's summaries when the state has none (the event log has expired).
export function absorbView(state, job, stages = true) {
  state.request = job.request;
  state.createdAt = job.created_at;
  state.startedAt = job.started_at ?? state.startedAt;
  state.parent = job.parent ?? null;
  if (job.status === "paused" && job.paused) state.paused = { ...job.paused, text: job.paused.text ?? "" };
  else if (job.status !== "paused" && state.status === "paused") state.paused = null;
  state.inputImage = (job.images || []).find((ref) => ref.stage === "input") ?? null;
  state.position = job.queue_position ?? null;
  if (TERMINAL.has(job.status) || job.status === "paused" || !Object.keys(state.iterations).length) state.status = job.status;
  if (job.final_image) state.finalImage = job.final_image;
  if (job.timings) state.timings = job.timings;
  if (job.usage) state.usage = job.usage;
  if (job.error) state.error = job.error;
  if (stages && !Object.keys(state.iterations).length) {
    for (const summary of job.stages || []) {
      const s = stageOf(state, summary.iteration, summary.stage);
      Object.assign(s, {
        status: "done",
        seconds: summary.seconds,
        text: summary.text ?? "",
        verdict: summary.verdict ?? null,
        image: summary.image ?? null,
      });
    }
  }
}

// A plan's text as instruction and scene: "<ins>...</ins> <des>...</des>", open tags allowed
// while it streams. Text outside the tags is kept as `rest`.
export function parsePlan(text) {
  const grab = (tag) => {
    const m = new RegExp(`<${tag}>([\\s\\S]*?)(?:</${tag}>|$)`, "i").exec(text);
    return m ? m[1].trim() : null;
  };
  const ins = grab("ins");
  const des = grab("des");
  const rest = text
    .replace(/<(ins|des)>[\s\S]*?(<\/\1>|$)/gi, "")
    .replace(/<\/?(ins|des)>?/gi, "")
    .trim();
  return { ins, des, rest };
}

// A reflection's text split around its <refine> block, for highlighting the instruction while it
// streams in: [{text, corrective: bool}, ...].
export function splitReflection(text) {
  const m = /<\s*refine\s*>([\s\S]*?)(<\s*[/\\]\s*refine\s*>|$)/i.exec(text);
  if (!m) return [{ text, corrective: false }];
  return [
    { text: text.slice(0, m.index), corrective: false },
    { text: m[1], corrective: true },
    { text: text.slice(m.index + m[0].length), corrective: false },
  ].filter((part) => part.text);
}
