// A fake of the gateway's HTTP answers for unit tests: SSE bodies delivered in the chunks a test
// chooses, a stream that stays open until the request is aborted, and JSON errors.

export const encoder = new TextEncoder();

export function sse(...events: unknown[]): string {
  return events.map((e) => `data: ${typeof e === "string" ? e : JSON.stringify(e)}\n\n`).join("");
}

export function tokenChunk(text: string) {
  return { id: "cmpl-1", object: "text_completion", choices: [{ index: 0, text, finish_reason: null }] };
}

export function finishChunk(reason = "length") {
  return { id: "cmpl-1", choices: [{ index: 0, text: "", finish_reason: reason }] };
}

export function usageChunk(prompt: number, completion: number, stageMs?: Record<string, number>) {
  return {
    id: "cmpl-1",
    choices: [],
    usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
    ...(stageMs ? { metrics: { stage_ms: stageMs } } : {}),
  };
}

/** A body that sends these byte chunks (strings are UTF-8 encoded), then closes. */
export function chunkedBody(chunks: (string | Uint8Array)[]): ReadableStream<Uint8Array> {
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(typeof c === "string" ? encoder.encode(c) : c);
      controller.close();
    },
  });
}

/** A body that sends `first` and then stays open until `signal` aborts (it then errors like a
 * browser's fetch body does); `cancelled` resolves when the stream is torn down. */
export function openBody(first: string, signal: AbortSignal) {
  let resolveClosed: () => void = () => {};
  const closed = new Promise<void>((r) => (resolveClosed = r));
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(encoder.encode(first));
      signal.addEventListener("abort", () => {
        controller.error(new DOMException("The user aborted a request.", "AbortError"));
        resolveClosed();
      });
    },
    cancel() {
      resolveClosed();
    },
  });
  return { body, closed };
}

export function streamResponse(body: ReadableStream<Uint8Array>, traceId?: string): Response {
  const headers: Record<string, string> = { "Content-Type": "text/event-stream" };
  if (traceId) headers["X-Trace-Id"] = traceId;
  return new Response(body, { status: 200, headers });
}

export function jsonResponse(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "Content-Type": "application/json", ...headers },
  });
}

export function openaiError(message: string, param: string | null, code: number) {
  return { error: { message, type: "invalid_request_error", param, code } };
}

export function roleChunk() {
  return { id: "chatcmpl-1", object: "chat.completion.chunk", choices: [{ index: 0, delta: { role: "assistant", content: "" }, finish_reason: null }] };
}

export function deltaChunk(content: string) {
  return { id: "chatcmpl-1", object: "chat.completion.chunk", choices: [{ index: 0, delta: { content }, finish_reason: null }] };
}

export function chatFinishChunk(reason = "length") {
  return { id: "chatcmpl-1", object: "chat.completion.chunk", choices: [{ index: 0, delta: {}, finish_reason: reason }] };
}

export const NODES = {
  model: "gpt2",
  tracing: true,
  ready: true,
  reason: "ready",
  tokenizer: { up: true, reason: "ready" },
  stages: [1, 2, 3].map((k) => ({
    name: `stage-${k}`,
    replicas: [
      {
        id: `stage-${k}`,
        address: `127.0.0.1:810${k}`,
        up: true,
        reason: "ready",
        kv: { sequences: k - 1, bytes: 2048 * (k - 1), capacity_bytes: 1 << 30 },
        kv_error: null,
      },
    ],
  })),
};
