// One streamed generation at a time, whichever view started it: its phase, the figures measured
// in the browser as tokens arrive, the gateway's result (usage, time per stage), the trace id, an
// error a person can act on, and Stop (aborting the request: the gateway then frees the sequence's
// KV cache in every stage).

import { useCallback, useEffect, useRef, useState } from "react";
import type { StreamHandlers, StreamResult } from "./client";
import { GatewayError } from "./errors";
import { type RequestMetrics, computeMetrics } from "./metrics";

export type Phase = "idle" | "running" | "done" | "stopped" | "failed";

/** Starts the request with the handlers given (signal, onStart, onToken). */
export type Send = (handlers: StreamHandlers) => Promise<StreamResult>;

export interface Generation {
  phase: Phase;
  error: string | null;
  metrics: RequestMetrics | null;
  result: StreamResult | null;
  traceId: string | null;
  /** Run one request; `onText` gets the text so far after each token. Null when it failed. */
  run: (send: Send, onText: (text: string) => void) => Promise<StreamResult | null>;
  fail: (message: string) => void; // a request refused before it was sent
  stop: () => void;
}

export function statusLine(phase: Phase, result: StreamResult | null, tokens: number): string {
  switch (phase) {
    case "running":
      return `Streaming… ${tokens} token${tokens === 1 ? "" : "s"} so far`;
    case "done":
      return `Finished (${result?.finishReason ?? "unknown reason"}) after ${tokens} tokens`;
    case "stopped":
      return `Stopped after ${tokens} tokens; the gateway frees the sequence's KV cache in every stage`;
    case "failed":
      return "Failed";
    default:
      return "Ready";
  }
}

export function useGeneration(afterwards: () => void): Generation {
  const [phase, setPhase] = useState<Phase>("idle");
  const [error, setError] = useState<string | null>(null);
  const [metrics, setMetrics] = useState<RequestMetrics | null>(null);
  const [result, setResult] = useState<StreamResult | null>(null);
  const [traceId, setTraceId] = useState<string | null>(null);
  const abort = useRef<AbortController | null>(null);

  useEffect(() => () => abort.current?.abort(), []);

  const fail = useCallback((message: string) => {
    setError(message);
    setPhase("failed");
  }, []);

  const run = useCallback(
    async (send: Send, onText: (text: string) => void) => {
      const ctrl = new AbortController();
      abort.current = ctrl;
      const start = performance.now();
      const times: number[] = [];
      let text = "";
      setPhase("running");
      setError(null);
      setResult(null);
      setTraceId(null);
      setMetrics(computeMetrics(start, times, start));
      let res: StreamResult | null = null;
      try {
        res = await send({
          signal: ctrl.signal,
          onStart: setTraceId,
          onToken: (t) => {
            times.push(performance.now());
            text += t;
            onText(text);
            setMetrics(computeMetrics(start, times, performance.now()));
          },
        });
        setResult(res);
        setPhase(res.aborted ? "stopped" : "done");
      } catch (e) {
        fail(e instanceof GatewayError ? e.message : `Unexpected error: ${String(e)}`);
      } finally {
        // a request refused before any token has no figures worth showing (nor a trace id)
        const figures = res || times.length ? computeMetrics(start, times, performance.now()) : null;
        setMetrics(figures && { ...figures, promptTokens: res?.usage?.prompt_tokens ?? null });
        abort.current = null;
        setTimeout(afterwards, 250); // e.g. show the KV cache freed soon, not at the next tick
      }
      return res;
    },
    [afterwards, fail],
  );

  const stop = useCallback(() => abort.current?.abort(), []);
  return { phase, error, metrics, result, traceId, run, fail, stop };
}
