// The real `ai` package as a `useChat` app uses it: its Chat (AbstractChat, the class under
// @ai-sdk/react's useChat) with DefaultChatTransport pointed at lean's UI route.
//
//   node chat.mjs <lean url> <scene> <chat id> <message> [<client tool answer>]
//   node chat.mjs <lean url> <scene> <chat id> --resume
//
// With --resume it is a page reloaded mid-answer: a new Chat of that id, holding nothing,
// calls resumeStream() (what useChat's `resume: true` does on mount) and prints the same line.
//
// Sends the message, answers a client tool (onToolCall) by POSTing to lean's
// /v1/runs/{runId}/tool-results (the run id is in the message metadata), then asks
// for a resume (useChat's reconnect: lean answers 204 once nothing runs) and prints
// one JSON line: the chat's status, error, messages and what its callbacks saw.
import { AbstractChat, DefaultChatTransport } from "ai";

const [base, scene, chatId, text, toolAnswer] = process.argv.slice(2);

class State {
  constructor() {
    this.status = "ready";
    this.error = undefined;
    this.messages = [];
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [
      ...this.messages.slice(0, index),
      message,
      ...this.messages.slice(index + 1),
    ];
  }
  snapshot(value) {
    return structuredClone(value);
  }
}

class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new State() });
  }
}

const seen = { toolCalls: [], errors: [], finishes: [] };
const chat = new Chat({
  id: chatId,
  transport: new DefaultChatTransport({ api: `${base}/v1/scenes/${scene}/ui` }),
  onToolCall: async ({ toolCall }) => {
    seen.toolCalls.push(toolCall);
    const runId = chat.lastMessage?.metadata?.runId;
    const response = await fetch(`${base}/v1/runs/${runId}/tool-results`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ toolCallId: toolCall.toolCallId, result: toolAnswer ?? null }),
    });
    if (!response.ok) throw new Error(`tool-results: ${response.status}`);
  },
  onError: (error) => seen.errors.push(error.message),
  onFinish: ({ isAbort, isError, isDisconnect }) =>
    seen.finishes.push({ isAbort, isError, isDisconnect }),
});

let afterSend = {};
if (text === "--resume") {
  await chat.resumeStream(); // lean: the running answer from its start, then live
} else {
  await chat.sendMessage({ text });
  afterSend = { status: chat.status, error: chat.error?.message ?? null };
  await chat.resumeStream(); // lean: 204, nothing is running: the chat stays as it is
}
console.log(
  JSON.stringify({
    status: chat.status,
    error: chat.error?.message ?? null,
    ...afterSend,
    statusAfterResume: chat.status,
    messages: chat.messages,
    ...seen,
  }),
);
