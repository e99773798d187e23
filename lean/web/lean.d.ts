// Types of lean.js, lean's browser client (docs/protocol.md §1-§3, §6).

/** Where and as whom: `baseUrl` "" (the default) is the page's own origin. */
export interface ClientOptions {
  token?: string;
  baseUrl?: string;
}

export interface RunRequest {
  message?: string;
  inputs?: Record<string, string | number | boolean>;
  conversationId?: string;
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
}

/** Every event carries `seq`, its cursor in the run (the SSE id). */
interface Base {
  seq?: number;
  runId?: string;
}
export interface StartEvent extends Base {
  type: "start";
  runId: string;
  messageId: string;
  scene: string;
  model: string;
  conversationId: string;
}
export interface DeltaEvent extends Base {
  type: "delta";
  messageId: string;
  text: string;
  part: "content" | "thinking" | "refusal";
}
export interface ToolStartEvent extends Base {
  type: "tool_start";
  messageId: string;
  toolCallId: string;
  name: string;
  arguments: string;
}
export interface ToolEndEvent extends Base {
  type: "tool_end";
  messageId: string;
  toolCallId: string;
  name: string;
  result: string;
  durationMs: number;
  isError: boolean;
}
export interface WaitingEvent extends Base {
  type: "waiting";
  messageId: string;
  toolCallId: string;
  name: string;
  arguments: string;
}
export interface DoneEvent extends Base {
  type: "done";
  messageId: string;
  finishReason: string;
  usage: Usage;
  text: string;
  fallback: boolean;
}
export interface ErrorEvent extends Base {
  type: "error";
  messageId: string;
  code: string;
  message: string;
  retryable: boolean;
}
export type SceneEvent =
  | StartEvent
  | DeltaEvent
  | ToolStartEvent
  | ToolEndEvent
  | WaitingEvent
  | DoneEvent
  | ErrorEvent;

export interface Scene {
  name: string;
  model: string;
  inputs: string[];
  tools: string[];
  needsMessage: boolean;
}

export interface SavedMessage {
  role: "user" | "assistant";
  content: string;
  status: string;
  messageId: string;
  createdAt: string;
  [field: string]: unknown;
}

export const MAX_EVENT_CHARS: number;
export const MAX_QUEUED_EVENTS: number;

/** lean's error body (`status`, `code`) or a transport failure (`status` 0). */
export class LeanError extends Error {
  status: number;
  code: string;
  retryable: boolean;
}

export interface SSEMessage {
  event: string;
  data: string;
  id: string;
  retry: number | null;
}
export class SSEDecoder {
  constructor(options?: { maxEventChars?: number });
  push(text: string): SSEMessage[];
}
export function readSSE(
  body: ReadableStream<Uint8Array>,
  options?: { maxEventChars?: number },
): AsyncGenerator<SSEMessage, void, undefined>;

export function scenes(options?: ClientOptions & { signal?: AbortSignal }): Promise<Scene[]>;
export function models(options?: ClientOptions & { signal?: AbortSignal }): Promise<unknown[]>;
export function history(
  conversationId: string,
  options?: ClientOptions & { signal?: AbortSignal },
): Promise<SavedMessage[]>;
export function cancel(runId: string, options?: ClientOptions): Promise<unknown>;
export function toolResult(
  runId: string,
  toolCallId: string,
  result: unknown,
  options?: ClientOptions,
): Promise<unknown>;

/** A scene run over fetch: iterate it once. `runId` is set by its `start` event;
 * `cursor` is the last event's `seq` (where a resume will start, once lean serves one). */
export class SceneStream implements AsyncIterable<SceneEvent> {
  constructor(scene: string, options?: RunRequest & ClientOptions & { signal?: AbortSignal });
  readonly scene: string;
  runId: string | null;
  conversationId: string | null;
  cursor: number;
  ended: boolean;
  [Symbol.asyncIterator](): AsyncGenerator<SceneEvent, void, undefined>;
  cancel(): Promise<unknown>;
  toolResult(toolCallId: string, result: unknown): Promise<unknown>;
}
export function stream(
  scene: string,
  options?: RunRequest & ClientOptions & { signal?: AbortSignal },
): SceneStream;

/** OpenAI Chat Completions, streamed: yields each `chat.completion.chunk`. */
export function chatCompletions(
  request: {
    model: string;
    messages: Array<Record<string, unknown>>;
    signal?: AbortSignal;
    [field: string]: unknown;
  } & ClientOptions,
): AsyncGenerator<Record<string, any>, void, undefined>;

export interface SessionRun extends AsyncIterable<SceneEvent> {
  readonly runId: string;
  conversationId: string | null;
  cancel(): void;
  toolResult(toolCallId: string, result: unknown): void;
}

/** One WebSocket to /v1/ws carrying several runs; the token goes as the subprotocol
 * `lean.bearer.<token>` (or as `access_token` when it cannot be a subprotocol name). */
export class Session {
  constructor(options?: ClientOptions);
  /** Error frames that belong to no run of this session. */
  onerror?: (frame: ErrorEvent) => void;
  open(): Promise<Session>;
  run(scene: string, request?: RunRequest & { runId?: string }): SessionRun;
  cancel(runId: string): void;
  toolResult(runId: string, toolCallId: string, result: unknown): void;
  close(): void;
}
