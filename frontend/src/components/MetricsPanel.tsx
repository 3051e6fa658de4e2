import { type RequestMetrics, formatMs } from "../metrics";
import { traceUrl } from "../settings";
import { LatencyChart } from "./LatencyChart";

interface Props {
  metrics: RequestMetrics | null;
  stageMs: Record<string, number> | null;
  traceId: string | null;
  tracing: boolean | null; // the gateway exports traces (GET /api/nodes); null: not known yet
  jaegerUrl: string;
  finished: boolean;
}

function StageTimes({ stageMs }: { stageMs: Record<string, number> }) {
  const entries = Object.entries(stageMs);
  const max = Math.max(...entries.map(([, ms]) => ms), 0.001);
  return (
    <ul className="bars" aria-label="Time per stage">
      {entries.map(([name, ms]) => (
        <li key={name} data-testid={`stage-time-${name}`}>
          <span className="bar-label">{name}</span>
          <span className="bar" style={{ width: `${(100 * ms) / max}%` }} aria-hidden="true" />
          <span className="bar-value">{formatMs(ms)}</span>
        </li>
      ))}
    </ul>
  );
}

/** The request's figures: time to first token, decode rate, total time, token counts, time per
 * stage (from the gateway), the inter-token latency chart and, when the gateway traces, the link to
 * the request's trace. */
export function MetricsPanel({ metrics, stageMs, traceId, tracing, jaegerUrl, finished }: Props) {
  if (!metrics) return <p className="hint">Metrics appear once a request runs.</p>;
  const rate = metrics.tokensPerSecond === null ? "–" : metrics.tokensPerSecond.toFixed(1);
  const rows: [string, string, string][] = [
    ["ttft", "Time to first token", formatMs(metrics.ttftMs)],
    ["rate", "Tokens per second (after the first)", rate],
    ["total", finished ? "Total time" : "Time so far", formatMs(metrics.totalMs)],
    ["prompt", "Prompt tokens", metrics.promptTokens === null ? "–" : String(metrics.promptTokens)],
    ["generated", "Generated tokens", String(metrics.generatedTokens)],
  ];
  return (
    <div className="metrics">
      <dl>
        {rows.map(([id, label, value]) => (
          <div key={id} className="metric">
            <dt>{label}</dt>
            <dd data-testid={`metric-${id}`}>{value}</dd>
          </div>
        ))}
      </dl>
      <h3>Time per stage</h3>
      {stageMs ? (
        <StageTimes stageMs={stageMs} />
      ) : (
        <p className="hint">The gateway reports it when the generation ends.</p>
      )}
      <h3>Inter-token latency</h3>
      <LatencyChart gapsMs={metrics.interTokenMs} />
      <h3>Trace</h3>
      {tracing && traceId ? (
        <a href={traceUrl(jaegerUrl, traceId)} target="_blank" rel="noreferrer" data-testid="trace-link">
          Open trace {traceId.slice(0, 12)}… in Jaeger
        </a>
      ) : (
        <p className="hint" data-testid="trace-hint">
          {tracing === false
            ? "Tracing is off on the gateway (set OTEL_EXPORTER_OTLP_ENDPOINT to trace requests)."
            : "The trace link appears once the request has a trace id."}
        </p>
      )}
    </div>
  );
}
