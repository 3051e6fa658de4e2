// The gateway's GET /api/nodes (gateway/nodes.py), polled for the node health panel; it also says
// whether the gateway traces (the metrics panel links a request's trace only then) and which model it
// serves in how many stages (the page's subtitle).

import { useCallback, useEffect, useState } from "react";
import { authHeaders } from "./settings";

export interface KVUse {
  sequences: number;
  bytes: number;
  capacity_bytes: number | null;
}

export interface ReplicaStatus {
  id: string;
  address: string;
  up: boolean;
  reason: string;
  kv: KVUse | null;
  kv_error: string | null;
}

export interface NodesStatus {
  model: string;
  ready: boolean;
  reason: string;
  tokenizer: { up: boolean; reason: string };
  stages: { name: string; replicas: ReplicaStatus[] }[];
  tracing: boolean;
}

export interface NodesState {
  status: NodesStatus | null;
  error: string | null;
  updatedAt: Date | null;
}

export interface LiveNodes extends NodesState {
  refresh: () => void; // ask now (e.g. right after a generation ended) instead of at the next tick
}

/** The page's subtitle: the served model and its stage count once GET /api/nodes answered (any
 * family, any N), a generic line until then. */
export function subtitle(status: NodesStatus | null): string {
  const what = status
    ? `${status.model} as a pipeline of ${status.stages.length} stage functions`
    : "A language model as a pipeline of stage functions";
  return `${what}: watch a request go through it.`;
}

export async function fetchNodes(
  gatewayUrl: string,
  fetchImpl: typeof fetch = fetch,
  apiKey = "",
): Promise<NodesStatus> {
  const url = `${gatewayUrl.replace(/\/+$/, "")}/api/nodes`;
  let response: Response;
  try {
    response = await fetchImpl(url, { signal: AbortSignal.timeout(1500), headers: authHeaders(apiKey) });
  } catch {
    throw new Error(`cannot reach the gateway at ${url}`);
  }
  if (response.status === 401) throw new Error(`GET ${url} wants an API key: enter it in Settings`);
  if (!response.ok) throw new Error(`GET ${url} answered ${response.status}`);
  return (await response.json()) as NodesStatus;
}

/** The last node status, refreshed every `intervalMs` and on `refresh()`; the last good one stays
 * on screen (marked stale by `error`) while the gateway does not answer. */
export function useNodes(
  gatewayUrl: string,
  intervalMs = 2000,
  fetchImpl: typeof fetch = fetch,
  apiKey = "",
): LiveNodes {
  const [state, setState] = useState<NodesState>({ status: null, error: null, updatedAt: null });
  const [asked, setAsked] = useState(0);
  const refresh = useCallback(() => setAsked((n) => n + 1), []);
  useEffect(() => {
    let live = true;
    const poll = async () => {
      try {
        const status = await fetchNodes(gatewayUrl, fetchImpl, apiKey);
        if (live) setState({ status, error: null, updatedAt: new Date() });
      } catch (e) {
        if (live) setState((s) => ({ ...s, error: e instanceof Error ? e.message : String(e) }));
      }
    };
    void poll();
    const timer = setInterval(() => void poll(), intervalMs);
    return () => {
      live = false;
      clearInterval(timer);
    };
  }, [gatewayUrl, intervalMs, fetchImpl, apiKey, asked]);
  return { ...state, refresh };
}
