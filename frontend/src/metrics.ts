// Per-request figures measured in the browser from when each token arrived.

export interface RequestMetrics {
  ttftMs: number | null; // request sent -> first token
  totalMs: number; // request sent -> end
  tokensPerSecond: number | null; // decode rate: tokens after the first / time after the first
  generatedTokens: number;
  promptTokens: number | null; // from the gateway's usage chunk
  interTokenMs: number[]; // gaps between consecutive tokens
}

export function computeMetrics(
  startMs: number,
  tokenTimesMs: number[],
  endMs: number,
  promptTokens: number | null = null,
): RequestMetrics {
  const n = tokenTimesMs.length;
  const gaps = tokenTimesMs.slice(1).map((t, i) => t - tokenTimesMs[i]);
  const decodeMs = n > 1 ? tokenTimesMs[n - 1] - tokenTimesMs[0] : 0;
  return {
    ttftMs: n ? tokenTimesMs[0] - startMs : null,
    totalMs: endMs - startMs,
    tokensPerSecond: decodeMs > 0 ? ((n - 1) * 1000) / decodeMs : null,
    generatedTokens: n,
    promptTokens,
    interTokenMs: gaps,
  };
}

export function formatMs(ms: number | null): string {
  if (ms === null) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
}

export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}
