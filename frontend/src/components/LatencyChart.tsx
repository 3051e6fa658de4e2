const W = 320;
const H = 90;
const PAD = 4;

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** Inter-token latency, one point per gap between tokens, as a small inline SVG line. */
export function LatencyChart({ gapsMs }: { gapsMs: number[] }) {
  if (gapsMs.length < 2) {
    return <p className="hint">The inter-token latency chart appears after a few tokens.</p>;
  }
  const max = Math.max(...gapsMs, 0.001);
  const x = (i: number) => PAD + (i * (W - 2 * PAD)) / (gapsMs.length - 1);
  const y = (v: number) => H - PAD - (v / max) * (H - 2 * PAD);
  const points = gapsMs.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const med = median(gapsMs);
  const label =
    `Inter-token latency over ${gapsMs.length} gaps: median ${med.toFixed(1)} ms, ` +
    `max ${max.toFixed(1)} ms`;
  return (
    <figure className="chart">
      <svg viewBox={`0 0 ${W} ${H}`} role="img" aria-label={label} preserveAspectRatio="none">
        <line className="median" x1={PAD} x2={W - PAD} y1={y(med)} y2={y(med)} />
        <polyline points={points} />
      </svg>
      <figcaption>
        {label} (dashed: median; top of the chart: {max.toFixed(1)} ms)
      </figcaption>
    </figure>
  );
}
