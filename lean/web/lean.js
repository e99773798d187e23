// lean.js: lean's browser client (docs/protocol.md §1-§3, §6). One ES module, no build
// step, no dependency. Served by lean at /lean.js, types at /lean.d.ts.
//
//   import { stream } from "/lean.js";
//   for await (const event of stream("chat", { message: "Hi" })) { ... }
//
// What it guarantees:
// - Scene runs over fetch: `stream()` yields every scene event (§2) in order, each with
//   `seq` (its SSE id, the run's cursor), and ends after `done` or `error`, which are
//   yielded, not thrown. It throws a `LeanError` only when no answer can follow: an HTTP
//   error before the stream (status, code and message from lean's error body), a network
//   failure, or a stream that ended before its final event.
// - The SSE reader follows WHATWG HTML "Server-sent events" (interpreting an event stream),
//   the same rules as lean/sse.py: LF, CR and CRLF end a line (a CRLF split across two reads
//   is one line end), one leading BOM is dropped, `:` lines are comments, one space after
//   the colon is removed, multi-line `data` is joined with LF, an `id` holding NUL is
//   ignored, a blank line dispatches only when data was seen, an unterminated last event is
//   dropped. One event is bounded (MAX_EVENT_CHARS).
// - Tokens go in the Authorization header; a WebSocket cannot set headers, so `Session`
//   offers its token as the subprotocol `lean.bearer.<token>` beside `lean` (kept out of
//   URLs, which proxies log), or, for a token that is not a valid subprotocol name, as the
//   `access_token` query parameter of the upgrade. lean.js never logs a token.
// - Resume (docs/protocol.md §6): a `SceneStream` whose connection drops (a network
//   failure, a proxy's timeout, a stream cut before its final event) reconnects by itself to
//   `GET /v1/runs/{runId}/stream?after=N`, N the last `seq` it yielded, and goes on with the
//   next event: nothing twice, nothing missing (`204`: it had the run's last event already). lean keeps a run going for
//   `resume_grace` seconds without a reader. Each running stream's run id and cursor are kept
//   in `sessionStorage` (`lean.runs`), so after a reload `unfinished()` tells which runs
//   were being read and `resume(runId)` reads them again (from the start, or from `after`).
//   When lean can no longer honour a cursor it restarts the answer: a second `start` event
//   (yielded with `restart: true`), then the answer so far in one `delta`: a reader clears
//   what it showed for the run.

/** Largest event the SSE reader holds, in UTF-16 code units. A `done` event carries the
 * whole answer and a `tool_end` a tool result (256 KiB by default): 8 Mi is far above
 * both, and a broken server that never ends an event cannot grow a page's memory past it. */
export const MAX_EVENT_CHARS = 8 * 1024 * 1024;

/** Events a `Session` run may hold before its reader takes them. lean does not slow one
 * run of a socket for another, so a reader that stops reading must not grow memory: past
 * this the run is cancelled and ends with a local `error` (code `slow_client`). */
export const MAX_QUEUED_EVENTS = 4096;

const FINAL = new Set(["done", "error"]);

/** An error lean answered (HTTP status + OpenAI-style body) or a transport failure
 * (`status` 0). Never carries a token. */
export class LeanError extends Error {
  constructor(message, { status = 0, code = "network", retryable = false } = {}) {
    super(message);
    this.name = "LeanError";
    this.status = status;
    this.code = code;
    this.retryable = retryable;
  }
}

// --- SSE --------------------------------------------------------------------------------

/** Incremental SSE decoder: text in (already UTF-8 decoded), messages out. Holds no I/O. */
export class SSEDecoder {
  constructor({ maxEventChars = MAX_EVENT_CHARS } = {}) {
    this.max = maxEventChars;
    this.tail = ""; // the incomplete line
    this.skipLF = false; // the last chunk ended in CR: an LF next is the same line end
    this.atStart = true; // a leading BOM is still possible
    this.data = []; // data lines of the pending event
    this.size = 0;
    this.event = "";
    this.lastEventId = ""; // WHATWG: the id persists from event to event
    this.retry = null;
  }

  /** Take the next decoded text; return `{event, data, id, retry}` for each event it ends. */
  push(text) {
    if (this.atStart && text.length) {
      this.atStart = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this.skipLF) {
      this.skipLF = false;
      if (text.charCodeAt(0) === 10) text = text.slice(1);
    }
    const out = [];
    let start = 0;
    let buffered = this.tail;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = buffered + text.slice(start, i);
      buffered = "";
      if (c === 13) {
        if (i + 1 === text.length) this.skipLF = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
      this.line(line, out);
    }
    this.tail = buffered + text.slice(start);
    if (this.size + this.tail.length > this.max) {
      throw new LeanError(`an SSE event exceeds ${this.max} characters`, { code: "bad_stream" });
    }
    return out;
  }

  line(line, out) {
    if (line === "") {
      if (this.data.length) {
        const id = this.lastEventId;
        out.push({ event: this.event || "message", data: this.data.join("\n"), id, retry: this.retry });
      }
      this.data = [];
      this.size = 0;
      this.event = "";
      this.retry = null;
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ":" comment (lean's `: ping`)
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (name === "data") {
      this.data.push(value);
      this.size += value.length + 1;
      if (this.size > this.max) {
        throw new LeanError(`an SSE event exceeds ${this.max} characters`, { code: "bad_stream" });
      }
    } else if (name === "event") this.event = value;
    else if (name === "id") {
      if (!value.includes("\0")) this.lastEventId = value;
    } else if (name === "retry") {
      if (/^[0-9]+$/.test(value)) this.retry = Number(value);
    }
  }
}

/** The SSE messages of a fetch body, as they arrive. */
export async function* readSSE(body, options) {
  const decoder = new SSEDecoder(options);
  const text = new TextDecoder("utf-8", { ignoreBOM: true }); // the decoder drops one BOM itself
  const reader = body.getReader();
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield* decoder.push(text.decode(value, { stream: true }));
    }
    finished = true;
    yield* decoder.push(text.decode()); // bytes of a cut UTF-8 sequence become U+FFFD
  } finally {
    // A reader that stops early closes the connection: lean sees the client leave.
    if (!finished) reader.cancel().catch(() => {});
    else reader.releaseLock();
  }
}

// --- HTTP -------------------------------------------------------------------------------

function url(baseUrl, path) {
  return (baseUrl || "").replace(/\/+$/, "") + path;
}

function headers(token, more) {
  const h = { ...more };
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function failure(response) {
  let message = `HTTP ${response.status}`;
  let code = "http_error";
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || body.error.type || code;
    }
  } catch {
    // not lean's JSON error body: keep the status line
  }
  const retryable = response.status === 429 || response.status === 503 || response.status === 504;
  return new LeanError(message, { status: response.status, code, retryable });
}

async function send(path, { method = "GET", body, token, baseUrl, signal, accept } = {}) {
  const init = { method, signal, headers: headers(token, accept ? { Accept: accept } : {}) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url(baseUrl, path), init);
  } catch (exc) {
    if (exc && exc.name === "AbortError") throw exc;
    throw new LeanError(`cannot reach lean: ${exc && exc.message}`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

async function json(path, options) {
  return (await send(path, options)).json();
}

/** `GET /v1/scenes`: `[{name, model, inputs, tools, needsMessage}]`. */
export async function scenes({ token, baseUrl, signal } = {}) {
  return (await json("/v1/scenes", { token, baseUrl, signal })).scenes;
}

/** `GET /v1/models`: the model aliases. */
export async function models({ token, baseUrl, signal } = {}) {
  return (await json("/v1/models", { token, baseUrl, signal })).data;
}

/** `GET /v1/conversations/{id}/messages`: the saved messages, oldest first. */
export async function history(conversationId, { token, baseUrl, signal } = {}) {
  const path = `/v1/conversations/${encodeURIComponent(conversationId)}/messages`;
  return (await json(path, { token, baseUrl, signal })).messages;
}

/** `POST /v1/runs/{runId}/cancel`: the run's stream then ends with `error` code `cancelled`. */
export async function cancel(runId, { token, baseUrl } = {}) {
  const path = `/v1/runs/${encodeURIComponent(runId)}/cancel`;
  return json(path, { method: "POST", body: {}, token, baseUrl });
}

/** `POST /v1/runs/{runId}/tool-results`: answers a `waiting` event. */
export async function toolResult(runId, toolCallId, result, { token, baseUrl } = {}) {
  const path = `/v1/runs/${encodeURIComponent(runId)}/tool-results`;
  return json(path, { method: "POST", body: { toolCallId, result }, token, baseUrl });
}

/** How many times in a row a `SceneStream` reconnects before it gives up, and the waits
 * between tries (ms, doubling up to the cap). An event that arrives resets the count. */
export const RESUME_TRIES = 6;
const RESUME_WAIT_MS = 250;
const RESUME_WAIT_CAP_MS = 4000;

const RUNS = "lean.runs"; // sessionStorage: {runId: {scene, conversationId, cursor, at}}

function storage() {
  try {
    return typeof sessionStorage === "undefined" ? null : sessionStorage;
  } catch {
    return null; // a sandboxed frame may refuse storage: resume then lasts as long as the page
  }
}

function keptRuns() {
  const store = storage();
  if (!store) return {};
  try {
    const runs = JSON.parse(store.getItem(RUNS) || "{}");
    return runs && typeof runs === "object" ? runs : {};
  } catch {
    return {};
  }
}

function keep(runId, entry) {
  const store = storage();
  if (!store) return;
  const runs = keptRuns();
  if (entry) runs[runId] = entry;
  else delete runs[runId];
  try {
    store.setItem(RUNS, JSON.stringify(runs));
  } catch {
    // storage full: resume after a reload is lost, nothing else
  }
}

/** The runs this tab was reading when it stopped (a reload, a crash): `[{runId, scene,
 * conversationId, cursor}]`, newest first. `resume(runId)` reads one again; a run that
 * ended meanwhile answers from its saved message. */
export function unfinished() {
  return Object.entries(keptRuns())
    .map(([runId, run]) => ({ runId, ...run }))
    .sort((a, b) => (b.at || 0) - (a.at || 0));
}

/** Forget a run `unfinished()` listed (a page that will not resume it). */
export function forget(runId) {
  keep(runId, null);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    if (signal)
      signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          reject(signal.reason || new DOMException("aborted", "AbortError"));
        },
        { once: true },
      );
  });
}

function aborted(exc) {
  return exc && exc.name === "AbortError";
}

/** A scene run over fetch + SSE. Iterate it once; `runId` is known after `start`.
 * Made by `stream()` (a new run) or `resume()` (a run by id, after a cursor). */
export class SceneStream {
  constructor(scene, { message, inputs, conversationId, signal, token, baseUrl, runId, after } = {}) {
    this.scene = scene;
    this.request = { inputs: inputs || {}, message: message || "" };
    if (conversationId) this.request.conversationId = conversationId;
    this.options = { token, baseUrl };
    this.signal = signal;
    this.runId = runId || null;
    this.conversationId = conversationId || null;
    this.cursor = after || 0; // the last event's `seq` (SSE id): where a resume starts
    this.ended = false;
    this.resumes = 0; // reconnections made, for a page that wants to say so
  }

  /** The response to read: the run's start, or its resume after the cursor. */
  async open() {
    if (!this.runId) {
      return send(`/v1/scenes/${encodeURIComponent(this.scene)}/stream`, {
        method: "POST",
        body: this.request,
        signal: this.signal,
        accept: "text/event-stream",
        ...this.options,
      });
    }
    const path = `/v1/runs/${encodeURIComponent(this.runId)}/stream?after=${this.cursor}`;
    return send(path, { signal: this.signal, accept: "text/event-stream", ...this.options });
  }

  async *[Symbol.asyncIterator]() {
    if (this.started) throw new Error("a SceneStream is iterated once");
    this.started = true;
    let tries = 0;
    try {
      for (;;) {
        let response;
        try {
          response = await this.open();
        } catch (exc) {
          // HTTP errors are lean's answer (404: the run is gone); only a network failure of
          // a run that has an id is tried again.
          if (exc instanceof LeanError && exc.status === 404 && this.runId) keep(this.runId, null);
          if (aborted(exc) || !this.runId || (exc instanceof LeanError && exc.status)) throw exc;
          if (++tries > RESUME_TRIES) throw exc;
          await sleep(Math.min(RESUME_WAIT_CAP_MS, RESUME_WAIT_MS * 2 ** (tries - 1)), this.signal);
          continue;
        }
        if (response.status === 204) return; // the cursor is at the run's last event: all seen
        try {
          for await (const message of readSSE(response.body)) {
            const event = this.event(message);
            if (event === null) continue;
            tries = 0;
            yield event;
            if (this.ended) return;
          }
        } catch (exc) {
          if (aborted(exc) || (exc instanceof LeanError && exc.code === "bad_stream")) throw exc;
          if (!this.runId) throw new LeanError(`the stream broke: ${exc && exc.message}`);
        }
        // The connection ended before the run's last event: resume after the cursor.
        if (!this.runId) throw new LeanError("the stream ended before its start event", { code: "cut" });
        if (++tries > RESUME_TRIES) {
          throw new LeanError("the stream ended before its done or error event", { code: "cut" });
        }
        this.resumes += 1;
        await sleep(tries === 1 ? 0 : Math.min(RESUME_WAIT_CAP_MS, RESUME_WAIT_MS * 2 ** (tries - 2)), this.signal);
      }
    } finally {
      if (this.ended && this.runId) keep(this.runId, null);
    }
  }

  /** One SSE message as a scene event, or null for one already yielded. */
  event(message) {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      throw new LeanError("lean sent an event that is not JSON", { code: "bad_stream" });
    }
    event.seq = Number(message.id) || 0;
    if (event.type === "start") {
      if (this.cursor > 0) event.restart = true; // lean restarted the answer: clear it
      this.runId = event.runId;
      this.conversationId = event.conversationId;
    } else if (event.seq && event.seq <= this.cursor) {
      return null; // seen before the connection dropped
    }
    this.cursor = event.seq || this.cursor;
    if (FINAL.has(event.type)) this.ended = true;
    else if (this.runId) {
      keep(this.runId, { scene: this.scene, conversationId: this.conversationId, cursor: this.cursor, at: Date.now() });
    }
    return event;
  }

  /** Stop the run (its stream then yields `error` code `cancelled`). */
  cancel() {
    if (!this.runId) throw new Error("the run has no id before its start event");
    return cancel(this.runId, this.options);
  }

  /** Answer this run's `waiting` event. */
  toolResult(toolCallId, result) {
    if (!this.runId) throw new Error("the run has no id before its start event");
    return toolResult(this.runId, toolCallId, result, this.options);
  }
}

/** Read a run again by id: its events after `after` (0: from its start), then the live
 * ones, reconnecting as `stream()` does. A run lean no longer has: `LeanError` status 404. */
export function resume(runId, { after = 0, scene, signal, token, baseUrl } = {}) {
  const kept = keptRuns()[runId];
  return new SceneStream(scene || (kept && kept.scene) || null, {
    runId,
    after,
    conversationId: kept && kept.conversationId,
    signal,
    token,
    baseUrl,
  });
}

/** A scene run as an async iterator of its events (see SceneStream). */
export function stream(scene, options) {
  return new SceneStream(scene, options);
}

/** `POST /v1/chat/completions` with `stream: true`: yields each `chat.completion.chunk`.
 * Every field but `signal`, `token` and `baseUrl` goes into the request body. Throws a
 * `LeanError` for an HTTP error, an error line in the stream, or a stream cut before
 * `[DONE]` (an answer is never finished on the provider's behalf). */
export async function* chatCompletions({ signal, token, baseUrl, ...body }) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    body: { ...body, stream: true },
    signal,
    token,
    baseUrl,
    accept: "text/event-stream",
  });
  for await (const message of readSSE(response.body)) {
    if (message.data === "[DONE]") return;
    const chunk = JSON.parse(message.data);
    if (chunk.error) {
      const { message: text, code, type } = chunk.error;
      throw new LeanError(text || "the stream failed", { code: code || type || "upstream_error" });
    }
    yield chunk;
  }
  throw new LeanError("the stream ended before [DONE]", { code: "cut" });
}

// --- WebSocket --------------------------------------------------------------------------

let counter = 0;

function newRunId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes); // crypto.randomUUID() needs a secure context; this does not
  counter += 1;
  return "r" + counter + "-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** One run of a Session: an async iterator of its events, with `runId` known at once. */
class SessionRun {
  constructor(session, runId) {
    this.session = session;
    this.runId = runId;
    this.conversationId = null;
    this.queue = [];
    this.wake = null;
    this.ended = false;
    this.failure = null;
  }

  deliver(event) {
    if (this.ended) return;
    if (event.type === "start") this.conversationId = event.conversationId;
    if (FINAL.has(event.type)) this.ended = true;
    if (this.queue.length >= MAX_QUEUED_EVENTS) {
      this.session.cancel(this.runId);
      this.queue.length = 0;
      event = { type: "error", runId: this.runId, code: "slow_client", message: "events were not read", retryable: false };
      this.ended = true;
    }
    this.queue.push(event);
    this.notify();
  }

  fail(error) {
    if (this.ended) return;
    this.ended = true;
    this.failure = error;
    this.notify();
  }

  notify() {
    const wake = this.wake;
    this.wake = null;
    if (wake) wake();
  }

  async *[Symbol.asyncIterator]() {
    try {
      for (;;) {
        if (this.queue.length) {
          const event = this.queue.shift();
          yield event;
          if (FINAL.has(event.type)) return;
          continue;
        }
        if (this.failure) throw this.failure;
        await new Promise((resolve) => (this.wake = resolve));
      }
    } finally {
      if (!this.ended) this.session.cancel(this.runId); // the reader left early
      this.session.runs.delete(this.runId);
    }
  }

  cancel() {
    this.session.cancel(this.runId);
  }

  toolResult(toolCallId, result) {
    this.session.toolResult(this.runId, toolCallId, result);
  }
}

const SUBPROTOCOL_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** One WebSocket (`/v1/ws`) carrying several runs, each an async iterator of its events. */
export class Session {
  constructor({ token, baseUrl } = {}) {
    const base = new URL(baseUrl || "/", typeof location === "undefined" ? undefined : location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    base.pathname = base.pathname.replace(/\/+$/, "") + "/v1/ws";
    // A WebSocket cannot set headers: the token rides as a subprotocol when it can be one
    // (RFC 6455 token characters), else in the query string.
    this.protocols = undefined;
    if (token && SUBPROTOCOL_TOKEN.test(token)) this.protocols = ["lean", `lean.bearer.${token}`];
    else if (token) base.searchParams.set("access_token", token);
    this.wsUrl = base.href;
    this.runs = new Map();
    this.socket = null;
    this.opened = null;
    this.closed = false;
  }

  /** Open the socket (run() does it when needed). */
  open() {
    if (this.opened) return this.opened;
    this.opened = new Promise((resolve, reject) => {
      const socket = new WebSocket(this.wsUrl, this.protocols);
      this.socket = socket;
      socket.onopen = () => resolve(this);
      socket.onmessage = (message) => this.receive(message.data);
      socket.onclose = (close) => {
        const error = new LeanError(`the WebSocket closed (${close.code})`, { code: "closed" });
        reject(error);
        this.closed = true;
        for (const run of this.runs.values()) run.fail(error);
        this.runs.clear();
      };
    });
    return this.opened;
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const run = frame.runId == null ? null : this.runs.get(frame.runId);
    if (run) run.deliver(frame);
    else if (this.onerror && frame.type === "error") this.onerror(frame);
  }

  async sendFrame(frame) {
    await this.open();
    if (this.closed) throw new LeanError("the WebSocket is closed", { code: "closed" });
    this.socket.send(JSON.stringify(frame));
  }

  /** Start a scene run on this socket; iterate the result for its events. */
  run(scene, { message, inputs, conversationId, runId } = {}) {
    const id = runId || newRunId();
    if (this.runs.has(id)) throw new Error(`run id '${id}' is already running on this session`);
    const run = new SessionRun(this, id);
    this.runs.set(id, run);
    const frame = { type: "run", runId: id, scene, inputs: inputs || {}, message: message || "" };
    if (conversationId) frame.conversationId = conversationId;
    this.sendFrame(frame).catch((error) => run.fail(error));
    return run;
  }

  /** Read a run again on this socket: its events after `after`, then the live ones. At a
   * finished run's last event lean sends nothing more: resume from a cursor you have not
   * seen the end of (the HTTP `resume()` gets `204` there and simply ends). */
  resume(runId, { after = 0 } = {}) {
    if (this.runs.has(runId)) throw new Error(`run id '${runId}' is already read on this session`);
    const run = new SessionRun(this, runId);
    this.runs.set(runId, run);
    this.sendFrame({ type: "resume", runId, after }).catch((error) => run.fail(error));
    return run;
  }

  cancel(runId) {
    this.sendFrame({ type: "cancel", runId }).catch(() => {});
  }

  toolResult(runId, toolCallId, result) {
    this.sendFrame({ type: "tool_result", runId, toolCallId, result }).catch(() => {});
  }

  close() {
    if (this.socket) this.socket.close(1000);
  }
}
