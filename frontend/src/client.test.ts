import { describe, expect, it, vi } from "vitest";
import { type CompletionParams, streamChat, streamCompletion } from "./client";
import { GatewayError, errorFromResponse, retryAfterSeconds } from "./errors";
import {
  chatFinishChunk,
  chunkedBody,
  deltaChunk,
  finishChunk,
  jsonResponse,
  openBody,
  openaiError,
  roleChunk,
  sse,
  streamResponse,
  tokenChunk,
  usageChunk,
} from "./test/fakeGateway";

const PARAMS: CompletionParams = { prompt: "Hello", max_tokens: 3, temperature: 0, top_p: 1, top_k: -1 };
const GW = "http://127.0.0.1:8000";

function failure(p: Promise<unknown>): Promise<GatewayError> {
  return p.then(
    () => {
      throw new Error("expected a GatewayError");
    },
    (e: unknown) => {
      expect(e).toBeInstanceOf(GatewayError);
      return e as GatewayError;
    },
  );
}

describe("streamCompletion", () => {
  it("streams tokens across arbitrary chunk boundaries and keeps usage, stage times and trace id", async () => {
    const text = sse(
      tokenChunk("Hel"),
      tokenChunk("lo 🙂"),
      tokenChunk("!"),
      finishChunk("length"),
      usageChunk(2, 3, { "stage-1": 1.5, "stage-2": 2, "stage-3": 3.25 }),
      "[DONE]",
    );
    const bytes = new TextEncoder().encode(text);
    const chunks: Uint8Array[] = [];
    for (let i = 0; i < bytes.length; i += 7) chunks.push(bytes.slice(i, i + 7)); // splits lines and the emoji
    const fetchImpl = vi.fn(async () => streamResponse(chunkedBody(chunks), "ab".repeat(16)));
    const tokens: string[] = [];
    const started = vi.fn();
    const res = await streamCompletion(GW + "/", PARAMS, {
      fetchImpl,
      onStart: started,
      onToken: (t) => tokens.push(t),
    });
    expect(tokens).toEqual(["Hel", "lo 🙂", "!"]);
    expect(res).toEqual({
      aborted: false,
      finishReason: "length",
      usage: { prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 },
      stageMs: { "stage-1": 1.5, "stage-2": 2, "stage-3": 3.25 },
      traceId: "ab".repeat(16),
    });
    expect(started).toHaveBeenCalledWith("ab".repeat(16));
    const [url, init] = fetchImpl.mock.calls[0] as unknown as [string, RequestInit];
    expect(url).toBe(`${GW}/v1/completions`);
    expect(JSON.parse(init.body as string)).toEqual({
      ...PARAMS,
      stream: true,
      stream_options: { include_usage: true },
    });
  });

  it("stops when aborted: the connection is closed and the result says aborted", async () => {
    const ctrl = new AbortController();
    let closed: Promise<void> = Promise.resolve();
    const fetchImpl = vi.fn(async (_url: string, init: RequestInit) => {
      const open = openBody(sse(tokenChunk("a"), tokenChunk("b")), init.signal as AbortSignal);
      closed = open.closed;
      return streamResponse(open.body);
    });
    const tokens: string[] = [];
    const pending = streamCompletion(GW, PARAMS, {
      fetchImpl: fetchImpl as unknown as typeof fetch,
      signal: ctrl.signal,
      onToken: (t) => {
        tokens.push(t);
        if (tokens.length === 2) ctrl.abort();
      },
    });
    const res = await pending;
    expect(res.aborted).toBe(true);
    expect(tokens).toEqual(["a", "b"]);
    await closed; // the body was torn down, so the browser drops the connection
  });

  it("an abort before the answer arrives is a stop, not an error", async () => {
    const ctrl = new AbortController();
    ctrl.abort();
    const fetchImpl = vi.fn(async () => {
      throw new DOMException("aborted", "AbortError");
    });
    const res = await streamCompletion(GW, PARAMS, { fetchImpl, signal: ctrl.signal });
    expect(res.aborted).toBe(true);
  });

  it("maps a refused parameter (400) to the gateway's reason", async () => {
    const body = openaiError("temperature must be in [0, 100], got 1000.0", "temperature", 400);
    const fetchImpl = vi.fn(async () => jsonResponse(400, body));
    const err = await failure(streamCompletion(GW, { ...PARAMS, temperature: 1000 }, { fetchImpl }));
    expect(err.kind).toBe("refused");
    expect(err.status).toBe(400);
    expect(err.message).toBe(
      "The gateway refused the request (400): temperature must be in [0, 100], got 1000.0 (parameter: temperature)",
    );
  });

  it("maps 429 to a busy message with the retry time", async () => {
    const body = openaiError("the queue is full (256 waiting)", null, 429);
    const fetchImpl = vi.fn(async () => jsonResponse(429, body, { "Retry-After": "3" }));
    const err = await failure(streamCompletion(GW, PARAMS, { fetchImpl }));
    expect(err.kind).toBe("busy");
    expect(err.retryAfterSeconds).toBe(3);
    expect(err.message).toBe("The gateway is busy (the queue is full (256 waiting)). Try again in 3 s.");
  });

  it("maps a network failure to 'cannot reach the gateway' naming the URL", async () => {
    const fetchImpl = vi.fn(async () => {
      throw new TypeError("Failed to fetch");
    });
    const err = await failure(streamCompletion(GW, PARAMS, { fetchImpl }));
    expect(err.kind).toBe("unreachable");
    expect(err.message).toContain(`Cannot reach the gateway at ${GW} (Failed to fetch)`);
  });

  it("maps an error event inside the stream, and a stream cut short", async () => {
    const broken = sse(tokenChunk("a"), openaiError("stage-2 is unavailable", null, 503));
    let fetchImpl = vi.fn(async () => streamResponse(chunkedBody([broken])));
    let err = await failure(streamCompletion(GW, PARAMS, { fetchImpl }));
    expect(err.kind).toBe("stream");
    expect(err.message).toBe("Generation failed: stage-2 is unavailable");
    fetchImpl = vi.fn(async () => streamResponse(chunkedBody([sse(tokenChunk("a"))])));
    err = await failure(streamCompletion(GW, PARAMS, { fetchImpl }));
    expect(err.message).toContain("ended before [DONE]");
  });
});

describe("streamChat", () => {
  it("sends the messages with the key, and streams the deltas as tokens (the role chunk is none)", async () => {
    const text = sse(roleChunk(), deltaChunk("Hi"), deltaChunk(" there"), chatFinishChunk("stop"), usageChunk(9, 2), "[DONE]");
    const fetchImpl = vi.fn(async () => streamResponse(chunkedBody([text])));
    const tokens: string[] = [];
    const messages = [{ role: "user" as const, content: "Hello" }];
    const { prompt: _, ...sampling } = PARAMS;
    const res = await streamChat(GW, messages, sampling, { fetchImpl, apiKey: "sk-key", onToken: (t) => tokens.push(t) });
    expect(tokens).toEqual(["Hi", " there"]);
    expect(res.finishReason).toBe("stop");
    expect(res.usage?.completion_tokens).toBe(2);
    const [url, init] = fetchImpl.mock.calls[0] as unknown as [string, RequestInit];
    expect(url).toBe(`${GW}/v1/chat/completions`);
    expect((init.headers as Record<string, string>).Authorization).toBe("Bearer sk-key");
    expect(JSON.parse(init.body as string)).toEqual({
      messages,
      ...sampling,
      stream: true,
      stream_options: { include_usage: true },
    });
  });

  it("sends no Authorization header without a key", async () => {
    const fetchImpl = vi.fn(async () => streamResponse(chunkedBody([sse(roleChunk(), chatFinishChunk(), "[DONE]")])));
    await streamChat(GW, [{ role: "user", content: "x" }], { max_tokens: 1, temperature: 0, top_p: 1, top_k: -1 }, { fetchImpl });
    const [, init] = fetchImpl.mock.calls[0] as unknown as [string, RequestInit];
    expect(init.headers).not.toHaveProperty("Authorization");
  });
});

describe("error mapping", () => {
  it("reads problem details and plain text bodies", () => {
    const h = new Headers();
    expect(errorFromResponse(503, JSON.stringify({ detail: "the gateway is not ready" }), h).message).toBe(
      "The gateway failed (503): the gateway is not ready",
    );
    expect(errorFromResponse(404, "Not Found", h).message).toBe("The gateway refused the request (404): Not Found");
    expect(errorFromResponse(429, "", h).message).toBe("The gateway is busy (no reason given). Try again shortly.");
  });

  it("reads Retry-After as seconds or as an HTTP date", () => {
    const now = Date.parse("Wed, 02 Dec 2026 10:00:00 GMT");
    expect(retryAfterSeconds("7", now)).toBe(7);
    expect(retryAfterSeconds("Wed, 02 Dec 2026 10:00:05 GMT", now)).toBe(5);
    expect(retryAfterSeconds("soon", now)).toBeUndefined();
    expect(retryAfterSeconds(null, now)).toBeUndefined();
  });
});
