// lean's chat page, on lean.js. Model and tool text is never HTML: every string reaches
// the page as a text node (textContent, createTextNode), never through innerHTML.
import { LeanError, cancel, forget, history, resume, scenes, stream, toolResult, unfinished } from "/lean.js";

const $ = (id) => document.getElementById(id);
const TOKEN = "lean.token"; // sessionStorage: the token lives as long as the tab
const CONVERSATIONS = "lean.conversations"; // localStorage: [{id, title, scene, at}]
const CURRENT = "lean.current"; // sessionStorage: the conversation shown, kept over a reload
const MAX_CONVERSATIONS = 200; // the list is a convenience; the store keeps every answer

const state = {
  token: sessionStorage.getItem(TOKEN) || "",
  scenes: [],
  conversation: sessionStorage.getItem(CURRENT) || null,
  run: null, // the SceneStream being read
  abort: null,
};

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) node.append(child); // strings become text nodes
  return node;
}

function status(text) {
  $("status").textContent = text;
}

function options() {
  return { token: state.token };
}

// --- conversations ----------------------------------------------------------------------

function listed() {
  try {
    const list = JSON.parse(localStorage.getItem(CONVERSATIONS) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function remember(id, title, scene) {
  const list = listed().filter((c) => c.id !== id);
  const old = listed().find((c) => c.id === id);
  list.unshift({ id, title: (old && old.title) || title || id, scene, at: Date.now() });
  localStorage.setItem(CONVERSATIONS, JSON.stringify(list.slice(0, MAX_CONVERSATIONS)));
  renderList();
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of listed()) {
    const button = el("button", "", c.title);
    button.type = "button";
    button.title = c.title;
    button.dataset.id = c.id;
    button.setAttribute("aria-current", String(c.id === state.conversation));
    button.addEventListener("click", () => open(c.id, c.scene));
    ul.append(el("li", "", button));
  }
}

function select(id) {
  state.conversation = id;
  if (id) sessionStorage.setItem(CURRENT, id);
  else sessionStorage.removeItem(CURRENT);
  renderList();
  $("side").classList.remove("open");
}

async function open(id, scene) {
  if (state.run) return;
  select(id);
  if (scene && state.scenes.some((s) => s.name === scene)) {
    $("scene").value = scene;
    renderInputs();
  }
  const box = $("messages");
  box.replaceChildren();
  status("loading…");
  let running = null;
  try {
    for (const m of await history(id, options())) {
      // An answer still being written (this page was reloaded, or another tab runs it):
      // read it live from its start; lean replays what it already said.
      if (m.role === "assistant" && m.status === "streaming" && m.runId && !running) running = m;
      else box.append(saved(m));
    }
    status("");
  } catch (error) {
    failed(error);
  }
  box.scrollTop = box.scrollHeight;
  if (running) {
    for (const run of unfinished()) if (run.conversationId === id && run.runId !== running.runId) forget(run.runId);
    state.abort = new AbortController();
    await follow(resume(running.runId, { signal: state.abort.signal, ...options() }), new Answer(), "");
  }
}

// --- messages ---------------------------------------------------------------------------

function userMessage(text) {
  return el("article", "msg user", el("div", "text", text));
}

/** An answer being built: text blocks and tool cards in the order they arrive. */
class Answer {
  constructor() {
    this.node = el("article", "msg assistant");
    this.node.dataset.status = "streaming";
    this.thinking = null;
    this.text = null; // the Text node deltas append to; null after a tool card
    this.cards = new Map();
  }

  think(text) {
    if (!this.thinking) {
      this.thinkingText = document.createTextNode("");
      this.thinking = el("details", "thinking", el("summary", "", "Thinking"), el("div", "text", this.thinkingText));
      this.node.prepend(this.thinking);
    }
    this.thinkingText.appendData(text);
  }

  say(text) {
    if (!this.text) {
      this.text = document.createTextNode("");
      this.node.append(el("div", "text", this.text));
    }
    this.text.appendData(text);
  }

  card(id, name, args) {
    let card = this.cards.get(id);
    if (!card) {
      card = new ToolCard(name, args);
      this.cards.set(id, card);
      this.node.append(card.node);
      this.text = null;
    }
    return card;
  }

  end(status, meta) {
    this.node.dataset.status = status;
    if (meta) this.node.append(el("div", "meta", meta));
  }

  fail(message) {
    this.node.append(el("div", "failure", message));
  }

  /** Empty again (a resumed run whose answer lean sends again from its start). */
  clear() {
    this.node.replaceChildren();
    this.thinking = null;
    this.text = null;
    this.cards = new Map();
  }
}

class ToolCard {
  constructor(name, args) {
    this.state = el("span", "state", "running");
    this.node = el(
      "div",
      "tool",
      el("header", "", el("span", "name", name), this.state),
      labelled("arguments", args),
    );
    this.node.dataset.state = "running";
  }

  set(state, label) {
    this.node.dataset.state = state;
    this.state.textContent = label || state;
    this.node.classList.toggle("error", state === "error");
  }

  result(result, durationMs, isError) {
    if (this.form) this.form.remove();
    this.node.append(labelled("result", result));
    const took = durationMs == null ? "" : ` · ${Math.round(durationMs)} ms`;
    this.set(isError ? "error" : "done", (isError ? "failed" : "done") + took);
  }

  /** `waiting`: the page is the tool; what the user types is the result. */
  ask(answer) {
    this.set("waiting", "waiting for you");
    const input = el("input", "");
    input.placeholder = "tool result";
    input.setAttribute("aria-label", "tool result");
    const button = el("button", "", "Send result");
    this.form = el("form", "", input, button);
    this.form.addEventListener("submit", async (event) => {
      event.preventDefault();
      button.disabled = input.disabled = true;
      try {
        await answer(input.value);
        // tool_end may have come first
        if (this.node.dataset.state === "waiting") this.set("running", "sent");
      } catch (error) {
        button.disabled = input.disabled = false;
        this.set("waiting", `not sent: ${error.message}`);
      }
    });
    this.node.append(this.form);
    input.focus();
  }
}

function labelled(name, text) {
  const pre = el("pre", name, pretty(text));
  pre.dataset.label = name;
  return pre;
}

function pretty(text) {
  if (typeof text !== "string") return JSON.stringify(text, null, 2);
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function usage(finishReason, prompt, completion, extra) {
  const parts = [finishReason === "stop" ? "" : finishReason];
  if (prompt != null || completion != null) parts.push(`${prompt ?? "?"} → ${completion ?? "?"} tokens`);
  if (extra) parts.push(extra);
  return parts.filter(Boolean).join(" · ");
}

/** A saved message from GET /v1/conversations/{id}/messages. */
function saved(m) {
  if (m.role !== "assistant") return userMessage(m.content);
  const answer = new Answer();
  if (m.reasoning) answer.think(m.reasoning);
  for (const call of m.toolCalls || []) {
    answer.card(call.id, call.name, call.arguments).result(call.result, call.durationMs, call.isError);
  }
  if (m.content) answer.say(m.content);
  answer.end(m.status, usage(m.finishReason, m.promptTokens, m.completionTokens, m.status !== "complete" ? m.status : ""));
  if (m.errorCode && m.status !== "cancelled") answer.fail(`error: ${m.errorCode}`);
  return answer.node;
}

// --- a run ------------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  if (state.run) return;
  const scene = state.scenes.find((s) => s.name === $("scene").value);
  if (!scene) return;
  const message = $("message").value;
  if (scene.needsMessage && !message.trim()) return;
  const inputs = {};
  // An empty field is left out: lean's 400 then names the input the scene needs.
  for (const input of $("inputs").querySelectorAll("input")) if (input.value) inputs[input.name] = input.value;

  $("messages").append(userMessage(message || Object.values(inputs).join(" · ")));
  $("message").value = "";
  state.abort = new AbortController();
  const run = stream(scene.name, {
    message,
    inputs,
    conversationId: state.conversation || undefined,
    signal: state.abort.signal,
    ...options(),
  });
  await follow(run, new Answer(), message, scene.name);
}

/** Show a run's events in `answer` until its end: a new run, or one resumed. */
async function follow(run, answer, message, sceneName) {
  const box = $("messages");
  box.append(answer.node);
  box.scrollTop = box.scrollHeight;
  state.run = run;
  busy(true);
  try {
    for await (const e of run) {
      if (e.type === "start") {
        if (e.restart) answer.clear(); // lean restarted the answer: it sends it whole again
        select(e.conversationId);
        if (sceneName) remember(e.conversationId, message.slice(0, 60), sceneName);
        answer.node.dataset.runId = e.runId;
        status("streaming…");
      } else if (e.type === "delta") {
        if (e.part === "thinking") answer.think(e.text);
        else answer.say(e.text);
      } else if (e.type === "tool_start") {
        answer.card(e.toolCallId, e.name, e.arguments);
      } else if (e.type === "waiting") {
        answer.card(e.toolCallId, e.name, e.arguments).ask((result) => toolResult(run.runId, e.toolCallId, result, options()));
      } else if (e.type === "tool_end") {
        answer.card(e.toolCallId, e.name, "").result(e.result, e.durationMs, e.isError);
      } else if (e.type === "done") {
        answer.end("complete", usage(e.finishReason, e.usage.promptTokens, e.usage.completionTokens));
      } else if (e.type === "error") {
        const cancelled = e.code === "cancelled";
        answer.end(cancelled ? "cancelled" : "error", cancelled ? "stopped" : "");
        if (!cancelled) answer.fail(`${e.code}: ${e.message}`);
      }
      if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
    }
    status("");
  } catch (error) {
    if (!run.runId && message && !$("message").value) $("message").value = message; // nothing was sent
    answer.end(error.name === "AbortError" ? "cancelled" : "error");
    if (error.name !== "AbortError") answer.fail(error.message);
    failed(error);
  } finally {
    state.run = null;
    state.abort = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
  $("send").hidden = on;
}

async function stop() {
  const run = state.run;
  if (!run) return;
  $("stop").disabled = true;
  try {
    // A cancel saves the partial answer as `cancelled`; before `start` there is no run id
    // yet, and leaving the stream cancels it (on_disconnect).
    if (run.runId) await cancel(run.runId, options());
    else state.abort.abort();
  } catch (error) {
    state.abort.abort();
  } finally {
    $("stop").disabled = false;
  }
}

// --- scenes, token ----------------------------------------------------------------------

function renderInputs() {
  const scene = state.scenes.find((s) => s.name === $("scene").value);
  const box = $("inputs");
  const before = {};
  for (const input of box.querySelectorAll("input")) before[input.name] = input.value;
  box.replaceChildren();
  for (const name of (scene && scene.inputs) || []) {
    const input = el("input", "");
    input.name = name;
    input.value = before[name] || "";
    box.append(el("label", "", name, input));
  }
  $("message").placeholder = scene && !scene.needsMessage ? "(this scene takes no message)" : "Message";
}

async function loadScenes() {
  try {
    state.scenes = await scenes(options());
  } catch (error) {
    failed(error);
    return false;
  }
  $("auth").hidden = true;
  const picker = $("scene");
  const chosen = picker.value;
  picker.replaceChildren(...state.scenes.map((s) => el("option", "", s.name)));
  if (state.scenes.some((s) => s.name === chosen)) picker.value = chosen;
  renderInputs();
  status(state.scenes.length ? "" : "no scenes in lean's config");
  return true;
}

function failed(error) {
  if (error instanceof LeanError && error.status === 401) {
    $("auth").hidden = false;
    $("token").focus();
    status("token needed");
  } else {
    status(error.message);
  }
}

async function useToken(event) {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN, state.token);
  $("token").value = "";
  if ((await loadScenes()) && state.conversation) open(state.conversation);
}

function newChat() {
  if (state.run) return;
  select(null);
  $("messages").replaceChildren();
  $("message").focus();
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
});
$("stop").addEventListener("click", stop);
$("auth").addEventListener("submit", useToken);
$("scene").addEventListener("change", renderInputs);
$("new").addEventListener("click", newChat);
$("menu").addEventListener("click", () => {
  const side = $("side");
  side.classList.toggle("open");
  $("menu").setAttribute("aria-expanded", String(side.classList.contains("open")));
});
// On a phone the list covers the page: a tap beside it closes it.
document.querySelector("main").addEventListener("click", (event) => {
  if ($("side").classList.contains("open") && !event.target.closest("#menu")) {
    $("side").classList.remove("open");
    $("menu").setAttribute("aria-expanded", "false");
  }
});
renderList();
if ((await loadScenes()) && state.conversation) open(state.conversation);
document.documentElement.dataset.ready = "true";
