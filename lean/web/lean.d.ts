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
  /** Set by lean.js on a second `start` of a resumed run: lean restarted the answer (the
   * cursor could not be honoured); clear what was shown for the run. */
  restart?: boolean;
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
 * `cursor` is the last event's `seq`. A dropped connection is resumed by itself (up to
 * `RESUME_TRIES` tries in a row), after the cursor: nothing twice, nothing missing. */
export class SceneStream implements AsyncIterable<SceneEvent> {
  constructor(
    scene: string | null,
    options?: RunRequest &
      ClientOptions & { signal?: AbortSignal; runId?: string; after?: number },
  );
  readonly scene: string | null;
  runId: string | null;
  conversationId: string | null;
  cursor: number;
  ended: boolean;
  /** Reconnections made so far. */
  resumes: number;
  [Symbol.asyncIterator](): AsyncGenerator<SceneEvent, void, undefined>;
  cancel(): Promise<unknown>;
  toolResult(toolCallId: string, result: unknown): Promise<unknown>;
}
export function stream(
  scene: string,
  options?: RunRequest & ClientOptions & { signal?: AbortSignal },
): SceneStream;

export const RESUME_TRIES: number;

/** Read a run again by id: its events after `after` (0, the default: from its start), then
 * the live ones. A run lean no longer has fails with `LeanError` status 404. */
export function resume(
  runId: string,
  options?: ClientOptions & { after?: number; scene?: string; signal?: AbortSignal },
): SceneStream;

export interface UnfinishedRun {
  runId: string;
  scene: string | null;
  conversationId: string | null;
  cursor: number;
}
/** The runs this tab was reading when it stopped (kept in sessionStorage), newest first. */
export function unfinished(): UnfinishedRun[];
/** Forget a run `unfinished()` lists. */
export function forget(runId: string): void;

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
  /** Read a run again on this socket: its events after `after`, then the live ones. */
  resume(runId: string, options?: { after?: number }): SessionRun;
  cancel(runId: string): void;
  toolResult(runId: string, toolCallId: string, result: unknown): void;
  close(): void;
}
