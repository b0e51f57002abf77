// The studio's HTTP client: JSON requests with the bearer key, errors in words, and Server-Sent
// Events read with fetch() (an EventSource cannot send Authorization or Last-Event-ID headers).
//
// Every error body of the API is {"error": {"type", "message", "param"?}}; ApiError keeps those,
// and describe() turns any failure into a sentence a person can act on.

const KEY_STORAGE = "strokes.apiKey";

export class ApiError extends Error {
  constructor(status, body, headers) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || "http_error";
    this.param = error.param || null;
    // Several bad fields at once: [{param, message}] (the first is `param`).
    this.fields = Array.isArray(error.errors) && error.errors.length ? error.errors : this.param ? [{ param: this.param, message: this.message }] : [];
    const retry = headers ? Number.parseInt(headers.get("Retry-After") || "", 10) : NaN;
    this.retryAfter = Number.isFinite(retry) ? retry : null;
  }
}

// A field error's ({param, message}: ApiError.fields) message without its "field: " prefix, for
// showing next to that field.
export function fieldMessage(field) {
  const prefix = `${field.param}: `;
  return field.message.startsWith(prefix) ? field.message.slice(prefix.length) : field.message;
}

export function describe(err) {
  if (err instanceof ApiError) {
    switch (err.status) {
      case 401:
        return "The service needs a valid API key: enter it above.";
      case 404:
        return err.message === "no such generation"
          ? "No such generation (it may have expired, or belong to another API key)."
          : `Not found: ${err.message}.`;
      case 413:
        return `Too large: ${err.message}.`;
      case 422:
        return err.message;
      case 429:
        return err.retryAfter != null
          ? `The queue is full. Try again in ${err.retryAfter} s.`
          : `Too many requests: ${err.message}. Try again shortly.`;
      case 503:
        return `The service is unavailable right now (${err.message}). Try again in ${err.retryAfter || 1} s.`;
      default:
        return `The service answered ${err.status}: ${err.message}`;
    }
  }
  if (err && err.name === "AbortError") return "Stopped.";
  return "Cannot reach the service: check the connection and try again.";
}

export class Api {
  constructor() {
    this.key = localStorage.getItem(KEY_STORAGE) || "";
  }

  setKey(key) {
    this.key = key;
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  }

  headers(extra = {}) {
    const headers = { ...extra };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  async send(method, path, { body, signal } = {}) {
    const init = { method, headers: this.headers({ Accept: "application/json" }), signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    if (res.status === 204) return null;
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!res.ok) throw new ApiError(res.status, data, res.headers);
    return data;
  }

  get(path, signal) {
    return this.send("GET", path, { signal });
  }

  post(path, body, signal) {
    return this.send("POST", path, { body, signal });
  }

  del(path) {
    return this.send("DELETE", path);
  }

  async blob(path, signal) {
    const res = await fetch(path, { headers: this.headers(), signal });
    if (!res.ok) {
      let data = null;
      try {
        data = await res.json();
      } catch {
        data = null;
      }
      throw new ApiError(res.status, data, res.headers);
    }
    return res.blob();
  }

  // Reads one SSE response to its end, calling onOpen() once it is connected and
  // onEvent({id, event, data}) for each event.
  // Resolves "ended" when the server closed the stream, "finished" on 204 (nothing more will
  // come); rejects with ApiError on an error status and with the fetch error when the network
  // drops. The caller reconnects with the last id it saw.
  async stream(path, lastEventId, signal, onEvent, onOpen = () => {}) {
    const headers = this.headers({ Accept: "text/event-stream" });
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const res = await fetch(path, { headers, signal, cache: "no-store" });
    if (res.status === 204) return "finished";
    if (!res.ok) {
      let data = null;
      try {
        data = await res.json();
      } catch {
        data = null;
      }
      throw new ApiError(res.status, data, res.headers);
    }
    onOpen();
    const parser = new SseParser(onEvent);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(value);
    }
    return "ended";
  }
}

// The WHATWG event-stream format: lines end in CRLF, LF or CR; "field: value"; a blank line
// dispatches the event; ":" starts a comment; "id" is kept until replaced.
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.event = "";
    this.data = [];
    this.id = null;
    this.skipLF = false;
  }

  feed(chunk) {
    // A chunk ending in CR may be the first half of a CRLF: its LF must not count as a new line.
    const text = this.skipLF && chunk.startsWith("\n") ? chunk.slice(1) : chunk;
    this.skipLF = text.endsWith("\r");
    this.buffer += text;
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop();
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.data.length || this.event) {
        this.onEvent({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
      }
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") this.event = value;
    else if (name === "data") this.data.push(value);
    else if (name === "id" && !value.includes("\0")) this.id = value;
  }
}
