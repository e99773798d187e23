// Browser scenarios for tests/test_browser.py: Debian's chromium, driven by playwright-core,
// against a lean the test started. One browser for all scenarios; each scenario is a fresh
// page (fresh sessionStorage) and reports what a person would see, as JSON on stdout.
//
//   node run.mjs '{"url": "http://127.0.0.1:PORT", "token": "...", "shots": "/dir", "scenarios": [...],
//                  "cross": {"page": "http://127.0.0.1:P2", "listed": "http://127.0.0.1:P3",
//                            "open": "http://127.0.0.1:P4"}}'
//
// The cross-origin scenarios run on `cross.page`, another origin's page (another port): `listed`
// is a lean whose cors_origins lists it, `url` a lean that does not, `open` one without tokens
// that lists only the same page reached as http://localhost:P2 (another origin).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const CHROMIUM = process.env.LEAN_CHROMIUM || "/usr/bin/chromium";
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const WAIT = 10_000; // ms: any one step; lean and its fake upstream answer in well under 1 s

const { url, token, shots, scenarios, cross } = JSON.parse(process.argv[2]);

async function page(context, { width = 1100, height = 760 } = {}) {
  const p = await context.newPage();
  await p.setViewportSize({ width, height });
  p.setDefaultTimeout(WAIT);
  p.errors = [];
  p.on("pageerror", (error) => p.errors.push(String(error)));
  // A 401 or 404 a scenario asks for is logged as "Failed to load resource": not a fault.
  p.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && p.errors.push(m.text()));
  await p.goto(url + "/");
  await p.waitForSelector("html[data-ready]");
  return p;
}

/** lean has tokens on: the page asks, the user types it. */
async function signIn(p) {
  await p.waitForSelector("#auth:not([hidden])");
  await p.fill("#token", token);
  await p.click("#auth button");
  await p.waitForSelector("#auth[hidden]", { state: "attached" });
  await p.waitForSelector("#scene option", { state: "attached" });
}

async function say(p, text) {
  const before = await p.locator("article.assistant").count();
  await p.fill("#message", text);
  await p.press("#message", "Enter");
  await p.waitForFunction((n) => document.querySelectorAll("article.assistant").length > n, before);
  return p.$("article.assistant:last-of-type");
}

/** The answer's status once it is no longer streaming. */
async function settled(p, answer) {
  await p.waitForFunction((a) => a.dataset.status !== "streaming", answer);
  return answer.getAttribute("data-status");
}

function visibleText(answer) {
  return answer.evaluate((a) =>
    Array.from(a.querySelectorAll(":scope > .text"), (t) => t.textContent).join(""),
  );
}

/** A page of another app, on another origin: no CSP, nothing of lean's. */
async function otherPage(context, origin = cross.page) {
  const p = await context.newPage();
  p.setDefaultTimeout(WAIT);
  p.errors = [];
  p.console = [];
  p.on("pageerror", (error) => p.errors.push(String(error)));
  // The favicon's 404 and a 401 a scenario asks for are "Failed to load resource": not a fault.
  p.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && p.console.push(m.text()));
  await p.goto(origin + "/");
  return p;
}

/** In the page: how each way a page reaches lean fares (event types seen, or how it failed). */
const ATTEMPTS = `
window.viaEventSource = (href, settle = 5000) =>
  new Promise((resolve) => {
    const source = new EventSource(href);
    const seen = { types: [], ids: [], text: "" };
    const end = (how) => {
      source.close();
      resolve({ ...seen, how, readyState: source.readyState });
    };
    for (const type of ["start", "delta", "tool_start", "tool_end", "waiting", "error"]) {
      source.addEventListener(type, (e) => {
        if (!(e instanceof MessageEvent)) return; // "error" is also a failed connection's event
        seen.types.push(type);
        seen.ids.push(e.lastEventId);
        const data = JSON.parse(e.data);
        if (type === "delta" && data.part === "content") seen.text += data.text;
      });
    }
    source.addEventListener("done", (e) => {
      seen.types.push("done");
      seen.done = JSON.parse(e.data);
      end("done");
    });
    source.onerror = () => end(source.readyState === EventSource.CLOSED ? "closed" : "error");
    setTimeout(() => end("timeout"), settle);
  });
window.viaWebSocket = (href) =>
  new Promise((resolve) => {
    const socket = new WebSocket(href);
    socket.onopen = () => {
      socket.close();
      resolve({ opened: true });
    };
    socket.onclose = (e) => resolve({ opened: false, code: e.code });
  });
`;

const conversation = (p) => p.evaluate(() => sessionStorage.getItem("lean.current"));

const run = {
  async chat(context) {
    const p = await page(context);
    const askedBefore = await p.isVisible("#auth");
    await p.screenshot({ path: join(shots, "token-desktop.png") });
    await signIn(p);
    const answer = await say(p, "Hello there");
    const status = await settled(p, answer);
    return {
      askedForToken: askedBefore,
      status,
      text: await visibleText(answer),
      thinking: await answer.$eval("details.thinking", (d) => d.textContent),
      thinkingOpen: await answer.$eval("details.thinking", (d) => d.open),
      thinkingVisible: await answer.$eval("details.thinking .text", (t) => t.checkVisibility()),
      conversationId: await conversation(p),
      listed: await p.locator("#conversations button").count(),
      tokenInSession: await p.evaluate(() => sessionStorage.getItem("lean.token") !== null),
      tokenInLocal: await p.evaluate((t) => JSON.stringify({ ...localStorage }).includes(t), token),
      errors: p.errors,
    };
  },

  async xss(context) {
    const p = await page(context);
    await signIn(p);
    const answer = await say(p, "show me xss");
    const status = await settled(p, answer);
    await p.waitForTimeout(200); // an onerror handler would have run by now
    await p.screenshot({ path: join(shots, "xss-desktop.png") });
    return {
      status,
      text: await visibleText(answer),
      images: await p.locator("#messages img").count(),
      pwned: await p.evaluate(() => window.__pwned === 1),
      errors: p.errors,
    };
  },

  async stop(context) {
    const p = await page(context);
    await signIn(p);
    const answer = await say(p, "slow please");
    await p.waitForFunction((a) => a.textContent.trim().length > 0 && a.dataset.runId, answer);
    await p.click("#stop");
    const status = await settled(p, answer);
    return {
      status,
      text: await visibleText(answer),
      conversationId: await conversation(p),
      sendBack: await p.isVisible("#send"),
      errors: p.errors,
    };
  },

  /** A reload mid-answer: the page reads the running answer again, to its end. */
  async reload(context) {
    const p = await page(context);
    await signIn(p);
    const answer = await say(p, "slow reload");
    await p.waitForFunction((a) => a.textContent.trim().length > 0 && a.dataset.runId, answer);
    const before = await visibleText(answer);
    const runId = await answer.getAttribute("data-run-id");
    await p.reload();
    await p.waitForSelector("html[data-ready]");
    // The token lives in sessionStorage: kept over the reload, nothing to ask.
    const resumed = await p.waitForSelector(`article.assistant[data-run-id="${runId}"]`);
    const status = await settled(p, resumed);
    const shot = join(shots, "reload.png");
    await p.screenshot({ path: shot });
    return {
      before,
      status,
      text: await visibleText(resumed),
      answers: await p.locator("article.assistant").count(),
      conversationId: await conversation(p),
      screenshot: shot,
      errors: p.errors,
    };
  },

  /** lean.js: the network drops mid-answer; the stream resumes by itself. */
  async dropped(context) {
    const p = await context.newPage();
    p.setDefaultTimeout(WAIT);
    p.errors = [];
    p.on("pageerror", (error) => p.errors.push(String(error)));
    await p.goto(cross.cutter + "/"); // lean through a relay the page can cut
    await p.waitForSelector("html[data-ready]");
    const out = await p.evaluate(async (token) => {
      window.__leanDrop = () => fetch("/__cut");
      const { stream } = await import("/lean.js");
      const run = stream("chat", { message: "slow drop", token });
      const seqs = [];
      let text = "";
      let cut = false;
      for await (const e of run) {
        seqs.push(e.seq);
        if (e.type === "delta") text += e.text;
        if (e.type === "delta" && !cut && seqs.length > 5) {
          cut = true;
          window.__leanDrop(); // the test's hook: the page's connection to lean is cut
        }
        if (e.type === "done" || e.type === "error") return { text, seqs, last: e.type, resumes: run.resumes };
      }
      return { text, seqs, last: null, resumes: run.resumes };
    }, token);
    return { ...out, errors: p.errors };
  },

  async waiting(context) {
    const p = await page(context);
    await signIn(p);
    const answer = await say(p, "ask me");
    const card = await answer.waitForSelector('.tool[data-state="waiting"]');
    const asked = await card.$eval("pre.arguments", (n) => n.textContent);
    await (await card.$("input")).fill("Paris");
    await (await card.$("button")).click();
    const status = await settled(p, answer);
    const shot = join(shots, "waiting-desktop.png");
    await p.screenshot({ path: shot });
    return {
      status,
      asked,
      cardState: await answer.$eval(".tool", (n) => n.dataset.state),
      cardResult: await answer.$eval(".tool pre.result", (n) => n.textContent),
      text: await visibleText(answer),
      conversationId: await conversation(p),
      screenshot: shot,
      errors: p.errors,
    };
  },

  async tools(context) {
    const p = await page(context);
    await signIn(p);
    const answer = await say(p, "use your tools");
    const status = await settled(p, answer);
    const cards = await answer.$$eval(".tool", (nodes) =>
      nodes.map((n) => ({
        name: n.querySelector(".name").textContent,
        state: n.dataset.state,
        label: n.querySelector(".state").textContent,
        result: n.querySelector("pre.result")?.textContent ?? null,
        error: n.classList.contains("error"),
      })),
    );
    return { status, cards, text: await visibleText(answer), conversationId: await conversation(p), errors: p.errors };
  },

  /** A scene with inputs: a field per input; a missing one is lean's 400, shown. */
  async inputs(context) {
    const p = await page(context);
    await signIn(p);
    await p.selectOption("#scene", "summary");
    const fields = await p.$$eval("#inputs input", (nodes) => nodes.map((n) => n.name));
    const refused = await say(p, "dear diary");
    const refusedStatus = await settled(p, refused);
    const failure = await refused.$eval(".failure", (n) => n.textContent);
    await p.fill('#inputs input[name="words"]', "5");
    const answer = await say(p, "dear diary");
    const status = await settled(p, answer);
    await p.screenshot({ path: join(shots, "inputs-desktop.png") });
    return {
      fields,
      refusedStatus,
      failure,
      status,
      text: await visibleText(answer),
      conversationId: await conversation(p),
      errors: p.errors,
    };
  },

  /** A new tab: the conversation list comes from localStorage, the messages from lean. */
  async history(context) {
    const p = await page(context);
    await signIn(p);
    const list = await p.locator("#conversations button").allTextContents();
    await p.locator("#conversations button", { hasText: "use your tools" }).click();
    await p.waitForSelector("#messages article.assistant .tool");
    await p.waitForFunction(() => document.getElementById("status").textContent === "");
    return {
      list,
      articles: await p.locator("#messages article").count(),
      cards: await p.locator("#messages .tool").count(),
      errorCards: await p.locator("#messages .tool.error").count(),
      text: await visibleText(await p.$("article.assistant:last-of-type")),
      errors: p.errors,
    };
  },

  /** A phone: nothing wider than the screen; a conversation mid-stream. */
  async phone(context) {
    const p = await page(context, { width: 390, height: 844 });
    await signIn(p);
    await p.click("#menu");
    await p.locator("#conversations button", { hasText: "ask me" }).click();
    await p.waitForSelector("#messages article.assistant .tool");
    const answer = await say(p, "slow please");
    await p.waitForFunction((a) => a.textContent.length > 20, answer);
    const shot = join(shots, "phone-streaming.png");
    await p.screenshot({ path: shot });
    const widths = await p.evaluate(() => ({
      scroll: document.documentElement.scrollWidth,
      client: document.documentElement.clientWidth,
      composer: document.getElementById("composer").getBoundingClientRect().right,
    }));
    await p.click("#stop");
    await settled(p, answer);
    return { ...widths, screenshot: shot, errors: p.errors };
  },

  /** lean.js from a page lean serves: fetch + SSE, WebSocket with several runs, chat completions. */
  async leanjs(context) {
    const p = await page(context);
    const out = await p.evaluate(async (token) => {
      const lean = await import("/lean.js");
      const o = { token };
      const types = (events) => events.map((e) => e.type);
      const collect = async (iterable) => {
        const events = [];
        for await (const e of iterable) events.push(e);
        return events;
      };

      const overFetch = await collect(lean.stream("chat", { message: "hello", ...o }));
      let unauthorized = null;
      try {
        await collect(lean.stream("chat", { message: "hello" }));
      } catch (error) {
        unauthorized = { name: error.name, status: error.status, code: error.code };
      }

      const session = new lean.Session(o);
      const slow = session.run("chat", { message: "slow please" });
      const quick = session.run("chat", { message: "hello" });
      const asking = session.run("chat", { message: "ask me" });
      const cancelled = (async () => {
        const events = [];
        for await (const e of slow) {
          events.push(e);
          if (e.type === "delta" && events.filter((x) => x.type === "delta").length === 2) slow.cancel();
        }
        return events;
      })();
      const answered = (async () => {
        const events = [];
        for await (const e of asking) {
          events.push(e);
          if (e.type === "waiting") asking.toolResult(e.toolCallId, "Oslo");
        }
        return events;
      })();
      const [slowEvents, quickEvents, askEvents] = await Promise.all([cancelled, collect(quick), answered]);
      session.close();

      let chatText = "";
      let chunks = 0;
      for await (const chunk of lean.chatCompletions({
        model: "default",
        messages: [{ role: "user", content: "hello" }],
        ...o,
      })) {
        chunks += 1;
        chatText += chunk.choices[0]?.delta?.content || "";
      }
      let unknownModel = null;
      try {
        for await (const _ of lean.chatCompletions({ model: "nope", messages: [{ role: "user", content: "hi" }], ...o }));
      } catch (error) {
        unknownModel = { status: error.status, code: error.code };
      }
      return {
        fetch: {
          types: types(overFetch),
          seqs: overFetch.map((e) => e.seq),
          text: overFetch.filter((e) => e.type === "delta" && e.part === "content").map((e) => e.text).join(""),
          done: overFetch.at(-1),
        },
        unauthorized,
        ws: {
          runIds: [slow.runId, quick.runId, asking.runId],
          slow: types(slowEvents),
          slowLast: slowEvents.at(-1),
          quick: types(quickEvents),
          quickText: quickEvents.at(-1).text,
          ask: types(askEvents),
          askText: askEvents.at(-1).text,
          allOwnRunId: [slowEvents, quickEvents, askEvents].every((events, i) =>
            events.every((e) => e.runId === [slow, quick, asking][i].runId),
          ),
        },
        chat: { text: chatText, chunks },
        unknownModel,
      };
    }, token);
    return { ...out, errors: p.errors };
  },
};

Object.assign(run, {
  /** lean.js imported from a lean that lists this page's origin: fetch, EventSource, WebSocket. */
  async crossOrigin(context) {
    const p = await otherPage(context);
    await p.addScriptTag({ content: ATTEMPTS });
    const out = await p.evaluate(
      async ({ base, token }) => {
        const lean = await import(base + "/lean.js");
        const o = { token, baseUrl: base };
        const overFetch = [];
        for await (const e of lean.stream("chat", { message: "hello from afar", ...o })) overFetch.push(e);
        const history = await lean.history(overFetch[0].conversationId, o);
        const query = new URLSearchParams({ message: "hello from afar", access_token: token });
        const eventSource = await viaEventSource(`${base}/v1/scenes/chat/stream?${query}`);
        const session = new lean.Session(o);
        const overWs = [];
        for await (const e of session.run("chat", { message: "hello from afar" })) overWs.push(e);
        session.close();
        // The token as a subprotocol, out of the URL: lean answers "lean".
        const bySubprotocol = await new Promise((resolve) => {
          const socket = new WebSocket(`${base.replace("http", "ws")}/v1/ws`, ["lean", `lean.bearer.${token}`]);
          const types = [];
          socket.onopen = () =>
            socket.send(JSON.stringify({ type: "run", runId: "p1", scene: "chat", message: "hello from afar" }));
          socket.onmessage = (m) => {
            const frame = JSON.parse(m.data);
            types.push(frame.type);
            if (frame.type === "done" || frame.type === "error") {
              resolve({ protocol: socket.protocol, types, text: frame.text });
              socket.close();
            }
          };
          socket.onclose = (e) => resolve({ protocol: socket.protocol, types, code: e.code });
        });
        let chatText = "";
        for await (const chunk of lean.chatCompletions({
          model: "default",
          messages: [{ role: "user", content: "hello from afar" }],
          ...o,
        })) {
          chatText += chunk.choices[0]?.delta?.content || "";
        }
        let refused = null;
        try {
          await lean.scenes({ baseUrl: base }); // no token: lean's 401, readable from here
        } catch (error) {
          refused = { status: error.status, code: error.code };
        }
        return {
          origin: location.origin,
          fetch: {
            types: overFetch.map((e) => e.type),
            text: overFetch.filter((e) => e.type === "delta" && e.part === "content").map((e) => e.text).join(""),
          },
          saved: history.find((m) => m.role === "assistant")?.content,
          eventSource,
          ws: { types: overWs.map((e) => e.type), text: overWs.at(-1).text },
          bySubprotocol,
          chatText,
          refused,
        };
      },
      { base: cross.listed, token },
    );
    return { ...out, console: p.console, errors: p.errors };
  },

  /** The same page against a lean that does not list its origin: every way is refused. */
  async crossOriginRefused(context) {
    const p = await otherPage(context);
    await p.addScriptTag({ content: ATTEMPTS });
    const out = await p.evaluate(
      async ({ base, listed, token }) => {
        let imported = "yes";
        try {
          await import(base + "/lean.js");
        } catch (error) {
          imported = String(error.name);
        }
        const lean = await import(listed + "/lean.js"); // the listed lean's copy, aimed at base
        let fetchError = null;
        try {
          for await (const _ of lean.stream("chat", { message: "refused from afar", token, baseUrl: base }));
        } catch (error) {
          fetchError = { name: error.name, status: error.status, message: error.message };
        }
        const query = new URLSearchParams({ message: "refused from afar", access_token: token });
        const eventSource = await viaEventSource(`${base}/v1/scenes/chat/stream?${query}`);
        const ws = await viaWebSocket(`${base.replace("http", "ws")}/v1/ws?access_token=${token}`);
        return { imported, fetchError, eventSource, ws };
      },
      { base: url, listed: cross.listed, token },
    );
    return { ...out, errors: p.errors };
  },

  /** A page on an origin not listed, against a lean on loopback without tokens: nothing runs. */
  async unlistedLoopback(context) {
    const p = await otherPage(context);
    await p.addScriptTag({ content: ATTEMPTS });
    const out = await p.evaluate(async (base) => {
      const body = JSON.stringify({ model: "default", messages: [{ role: "user", content: "spend it" }] });
      const chat = `${base}/v1/chat/completions`;
      const outcome = async (promise) => {
        try {
          const response = await promise;
          return response.type === "opaque" ? "opaque" : `status ${response.status}`;
        } catch (error) {
          return error.name;
        }
      };
      const json = await outcome(fetch(chat, { method: "POST", body, headers: { "Content-Type": "application/json" } }));
      const simple = await outcome(fetch(chat, { method: "POST", body, mode: "no-cors" }));
      const eventSource = await viaEventSource(`${base}/v1/scenes/chat/stream?message=spend+it`);
      const ws = await viaWebSocket(`${base.replace("http", "ws")}/v1/ws`);
      const image = await new Promise((resolve) => {
        const img = new Image();
        img.onload = () => resolve("load");
        img.onerror = () => resolve("error");
        img.src = `${base}/v1/scenes/chat/stream?message=spend+it`;
      });
      const form = await new Promise((resolve) => {
        const frame = document.createElement("iframe");
        frame.name = "sink";
        document.body.append(frame);
        const f = document.createElement("form");
        Object.assign(f, { method: "POST", action: chat, target: "sink", enctype: "text/plain" });
        const field = document.createElement("input");
        // text/plain sends `name=value`: a JSON body, as a CSRF page would shape it.
        const name = '{"model": "default", "messages": [{"role": "user", "content": "spend it"}], "x": "';
        Object.assign(field, { name, value: '"}' });
        f.append(field);
        document.body.append(f);
        frame.onload = () => resolve("submitted");
        f.submit();
      });
      return { json, simple, eventSource, ws, image, form };
    }, cross.open);
    // The same page from http://localhost:PORT, the origin this lean lists (127.0.0.1 is not).
    const listed = await otherPage(context, cross.page.replace("127.0.0.1", "localhost"));
    const fromListed = await listed.evaluate(async (base) => {
      const body = JSON.stringify({ model: "default", messages: [{ role: "user", content: "from localhost" }] });
      const headers = { "Content-Type": "application/json" };
      const response = await fetch(`${base}/v1/chat/completions`, { method: "POST", body, headers });
      return { origin: location.origin, status: response.status, text: (await response.json()).choices[0].message.content };
    }, cross.open);
    return { ...out, fromListed, errors: [...p.errors, ...listed.errors] };
  },
});

const dir = mkdtempSync(join(tmpdir(), "lean-chromium-"));
const context = await chromium.launchPersistentContext(dir, {
  executablePath: CHROMIUM,
  headless: true,
  args: FLAGS,
  timeout: 30_000,
});
const results = {};
try {
  for (const name of scenarios) {
    const started = Date.now();
    try {
      results[name] = await run[name](context);
    } catch (error) {
      results[name] = { failed: String(error && error.stack ? error.stack : error) };
    }
    results[name].ms = Date.now() - started;
  }
} finally {
  await context.close();
  rmSync(dir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(results));
