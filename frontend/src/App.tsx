import { useCallback, useEffect, useRef, useState } from "react";
import { type StreamResult, streamCompletion } from "./client";
import { MetricsPanel } from "./components/MetricsPanel";
import { NodesPanel } from "./components/NodesPanel";
import { ParamsForm } from "./components/ParamsForm";
import { SettingsPanel } from "./components/SettingsPanel";
import { GatewayError } from "./errors";
import { type RequestMetrics, computeMetrics } from "./metrics";
import { useNodes } from "./nodes";
import { DEFAULT_FIELDS, type FormFields, toParams } from "./params";
import { type Settings, loadSettings, saveSettings } from "./settings";

type Phase = "idle" | "running" | "done" | "stopped" | "failed";

function statusLine(phase: Phase, result: StreamResult | null, tokens: number): string {
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

export function App({ nodesIntervalMs = 2000 }: { nodesIntervalMs?: number }) {
  const [settings, setSettings] = useState<Settings>(() => loadSettings());
  const [fields, setFields] = useState<FormFields>(DEFAULT_FIELDS);
  const [phase, setPhase] = useState<Phase>("idle");
  const [output, setOutput] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [metrics, setMetrics] = useState<RequestMetrics | null>(null);
  const [result, setResult] = useState<StreamResult | null>(null);
  const [traceId, setTraceId] = useState<string | null>(null);
  const abort = useRef<AbortController | null>(null);
  const nodes = useNodes(settings.gatewayUrl, nodesIntervalMs);

  useEffect(() => () => abort.current?.abort(), []);

  const run = useCallback(async () => {
    let params;
    try {
      params = toParams(fields);
    } catch (e) {
      setError((e as Error).message);
      setPhase("failed");
      return;
    }
    const ctrl = new AbortController();
    abort.current = ctrl;
    const start = performance.now();
    const times: number[] = [];
    let text = "";
    setPhase("running");
    setOutput("");
    setError(null);
    setResult(null);
    setTraceId(null);
    setMetrics(computeMetrics(start, times, start));
    let res: StreamResult | null = null;
    try {
      res = await streamCompletion(settings.gatewayUrl, params, {
        signal: ctrl.signal,
        onStart: setTraceId,
        onToken: (t) => {
          times.push(performance.now());
          text += t;
          setOutput(text);
          setMetrics(computeMetrics(start, times, performance.now()));
        },
      });
      setResult(res);
      setPhase(res.aborted ? "stopped" : "done");
    } catch (e) {
      setError(e instanceof GatewayError ? e.message : `Unexpected error: ${String(e)}`);
      setPhase("failed");
    } finally {
      // a request refused before any token has no figures worth showing (nor a trace id)
      const figures = res || times.length ? computeMetrics(start, times, performance.now()) : null;
      setMetrics(figures && { ...figures, promptTokens: res?.usage?.prompt_tokens ?? null });
      abort.current = null;
      setTimeout(nodes.refresh, 250); // show the KV cache freed soon, not at the next tick
    }
  }, [fields, settings.gatewayUrl, nodes.refresh]);

  const stop = useCallback(() => abort.current?.abort(), []);
  const save = (s: Settings) => {
    saveSettings(s);
    setSettings(s);
  };
  const running = phase === "running";

  return (
    <>
      <header>
        <h1>tandem</h1>
        <p>GPT-2 as a pipeline of stage functions: watch a request go through it.</p>
      </header>
      <main>
        <section className="left" aria-labelledby="request-h">
          <h2 id="request-h">Request</h2>
          <ParamsForm fields={fields} running={running} onChange={setFields} onSubmit={run} onStop={stop} />
          {error && (
            <div className="error" role="alert" data-testid="error">
              {error}
            </div>
          )}
          <h2 id="output-h">Output</h2>
          <p className="status" role="status" data-testid="status">
            {statusLine(phase, result, metrics?.generatedTokens ?? 0)}
          </p>
          <pre className="output" aria-labelledby="output-h" data-testid="output" tabIndex={0}>
            {output}
          </pre>
        </section>
        <section className="right">
          <div className="panel">
            <h2>Metrics</h2>
            <MetricsPanel
              metrics={metrics}
              stageMs={result?.stageMs ?? null}
              traceId={traceId}
              jaegerUrl={settings.jaegerUrl}
              finished={!running}
            />
          </div>
          <div className="panel">
            <h2>Node health</h2>
            <NodesPanel state={nodes} />
          </div>
          <SettingsPanel settings={settings} onSave={save} />
        </section>
      </main>
    </>
  );
}
