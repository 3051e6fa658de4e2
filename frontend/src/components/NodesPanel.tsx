import { formatBytes } from "../metrics";
import type { NodesState, ReplicaStatus } from "../nodes";

function Replica({ r }: { r: ReplicaStatus }) {
  const kv = r.kv;
  return (
    <li className={`replica ${r.up ? "up" : "down"}`} data-testid={`replica-${r.id}`}>
      <span className="badge">{r.up ? "up" : "down"}</span>{" "}
      <strong>{r.id}</strong> <span className="hint">{r.address}</span>
      {!r.up && <div className="reason">{r.reason}</div>}
      {kv ? (
        <div className="kv" data-testid={`kv-${r.id}`}>
          KV cache: {kv.sequences} sequence{kv.sequences === 1 ? "" : "s"}, {formatBytes(kv.bytes)}
          {kv.capacity_bytes ? (
            <>
              {" "}
              of {formatBytes(kv.capacity_bytes)}{" "}
              <meter min={0} max={kv.capacity_bytes} value={kv.bytes} aria-label={`${r.id} KV cache use`} />
            </>
          ) : null}
        </div>
      ) : (
        <div className="kv hint">KV cache: unknown ({r.kv_error})</div>
      )}
    </li>
  );
}

/** Each stage's replicas as the gateway sees them, refreshed live. */
export function NodesPanel({ state }: { state: NodesState }) {
  const { status, error, updatedAt } = state;
  return (
    <div aria-live="polite" aria-busy={!status && !error}>
      {error && (
        <p className="error small" role="status">
          Node health {status ? "is stale" : "unavailable"}: {error}
        </p>
      )}
      {status && (
        <>
          <p data-testid="gateway-ready">
            Gateway <strong>{status.ready ? "ready" : "not ready"}</strong> ({status.model})
            {!status.ready && <span className="reason"> {status.reason}</span>}; tokenizer{" "}
            {status.tokenizer.up ? "up" : `down (${status.tokenizer.reason})`}
          </p>
          <ul className="stages">
            {status.stages.map((s) => (
              <li key={s.name} data-testid={`node-${s.name}`}>
                <h3>{s.name}</h3>
                <ul className="replicas">
                  {s.replicas.map((r) => (
                    <Replica key={r.id} r={r} />
                  ))}
                </ul>
              </li>
            ))}
          </ul>
          {updatedAt && <p className="hint">Updated {updatedAt.toLocaleTimeString()}</p>}
        </>
      )}
      {!status && !error && <p className="hint">Asking the gateway…</p>}
    </div>
  );
}
