// The gateway's streamed generations as the UI uses them: POST /v1/completions or
// /v1/chat/completions with `stream: true`, token chunks handed over as they arrive (a chat's
// opening chunk, which only names the role, is not a token), the usage chunk's counts and per-stage
// times kept, the trace id read from X-Trace-Id, the API key sent when there is one. Aborting the
// signal closes the connection; the gateway then cancels the sequence and frees its KV cache in
// every stage.

import { GatewayError, errorFromResponse, reasonOf, unreachable } from "./errors";
import { authHeaders } from "./settings";
import { sseEvents } from "./sse";

export interface CompletionParams {
  prompt: string;
  max_tokens: number;
  temperature: number;
  top_p: number;
  top_k: number;
  seed?: number;
  stop?: string[];
  ignore_eos?: boolean;
}

/** The generation parameters of either route (a completion's without its prompt). */
export type SamplingParams = Omit<CompletionParams, "prompt">;

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface StreamResult {
  aborted: boolean;
  finishReason: string | null;
  usage: Usage | null;
  stageMs: Record<string, number> | null; // tandem's extension on the usage chunk
  traceId: string | null;
}

export interface StreamHandlers {
  signal?: AbortSignal;
  onStart?: (traceId: string | null) => void;
  onToken?: (text: string) => void;
  fetchImpl?: typeof fetch;
  apiKey?: string;
}

interface Choice {
  text?: string; // a completion's
  delta?: { role?: string; content?: string }; // a chat's
  finish_reason?: string | null;
}

interface Chunk {
  choices?: Choice[];
  usage?: Usage | null;
  metrics?: { stage_ms?: Record<string, number> };
  error?: unknown;
}

export function completionsUrl(gatewayUrl: string): string {
  return `${gatewayUrl.replace(/\/+$/, "")}/v1/completions`;
}

export function chatUrl(gatewayUrl: string): string {
  return `${gatewayUrl.replace(/\/+$/, "")}/v1/chat/completions`;
}

function isAbort(e: unknown, signal?: AbortSignal): boolean {
  return Boolean(signal?.aborted) || (e instanceof DOMException && e.name === "AbortError");
}

export function streamCompletion(
  gatewayUrl: string,
  params: CompletionParams,
  handlers: StreamHandlers = {},
): Promise<StreamResult> {
  return streamFrom(gatewayUrl, completionsUrl(gatewayUrl), params, handlers, (c) => c.text ?? "");
}

/** A chat answer to `messages`, streamed. */
export function streamChat(
  gatewayUrl: string,
  messages: ChatMessage[],
  params: SamplingParams,
  handlers: StreamHandlers = {},
): Promise<StreamResult> {
  const body = { messages, ...params };
  return streamFrom(gatewayUrl, chatUrl(gatewayUrl), body, handlers, (c) =>
    c.delta?.role ? null : (c.delta?.content ?? ""),
  );
}

async function streamFrom(
  gatewayUrl: string,
  url: string,
  params: object,
  { signal, onStart, onToken, fetchImpl = fetch, apiKey = "" }: StreamHandlers,
  tokenOf: (choice: Choice) => string | null, // null: a chunk that carries no token
): Promise<StreamResult> {
  const result: StreamResult = { aborted: false, finishReason: null, usage: null, stageMs: null, traceId: null };
  let response: Response;
  try {
    response = await fetchImpl(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders(apiKey) },
      body: JSON.stringify({ ...params, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
  } catch (e) {
    if (isAbort(e, signal)) return { ...result, aborted: true };
    throw unreachable(gatewayUrl, e);
  }
  if (!response.ok) throw errorFromResponse(response.status, await response.text(), response.headers);
  if (!response.body) throw new GatewayError("The gateway sent no body.", "server", response.status);
  result.traceId = response.headers.get("X-Trace-Id");
  onStart?.(result.traceId);
  try {
    for await (const data of sseEvents(response.body)) {
      if (data === "[DONE]") return result;
      const chunk = JSON.parse(data) as Chunk;
      if (chunk.error) throw new GatewayError(`Generation failed: ${reasonOf(data)}`, "stream");
      for (const choice of chunk.choices ?? []) {
        const token = tokenOf(choice);
        if (choice.finish_reason) result.finishReason = choice.finish_reason;
        else if (token !== null) onToken?.(token);
      }
      if (chunk.usage) result.usage = chunk.usage;
      if (chunk.metrics?.stage_ms) result.stageMs = chunk.metrics.stage_ms;
    }
  } catch (e) {
    if (isAbort(e, signal)) return { ...result, aborted: true };
    if (e instanceof GatewayError) throw e;
    throw new GatewayError(`The stream broke off: ${e instanceof Error ? e.message : String(e)}`, "stream");
  }
  if (signal?.aborted) return { ...result, aborted: true };
  throw new GatewayError("The stream ended before [DONE]: the gateway may have stopped.", "stream");
}
