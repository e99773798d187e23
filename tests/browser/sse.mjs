// lean.js's SSE reader on byte streams (base64 JSON list on stdin): for each, the messages
// of the whole stream, and every split (in two at each offset, and byte by byte) that
// gives other messages. tests/test_browser.py compares the messages with lean/sse.py.
//
//   node sse.mjs /path/to/lean/web/lean.js < vectors.json
import { readFileSync } from "node:fs";

const source = readFileSync(process.argv[2], "utf8");
const { readSSE } = await import("data:text/javascript," + encodeURIComponent(source));

function body(chunks) {
  return new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
}

async function messages(chunks) {
  const out = [];
  for await (const m of readSSE(body(chunks))) out.push([m.event, m.data, m.id, m.retry]);
  return out;
}

const vectors = JSON.parse(readFileSync(0, "utf8")).map((b64) => new Uint8Array(Buffer.from(b64, "base64")));
const results = [];
for (const bytes of vectors) {
  const whole = await messages([bytes]);
  const expected = JSON.stringify(whole);
  const mismatches = [];
  for (let i = 0; i <= bytes.length; i++) {
    const got = await messages([bytes.slice(0, i), bytes.slice(i)]);
    if (JSON.stringify(got) !== expected) mismatches.push({ split: i, got });
  }
  const bytewise = await messages(Array.from(bytes, (b) => new Uint8Array([b])));
  if (JSON.stringify(bytewise) !== expected) mismatches.push({ split: "bytewise", got: bytewise });
  results.push({ messages: whole, mismatches });
}
process.stdout.write(JSON.stringify(results));
