// Where the UI finds the gateway and Jaeger. The page is served on :5173, the gateway on :8000, so
// the gateway is another origin (it allows this one through CORS, TANDEM_CORS_ORIGINS). Order:
// the URL's ?gateway= / ?jaeger=, then what was saved in Settings, then the page's
// <meta name="tandem-gateway-url"> (filled in by the local stack's server), then the build's
// VITE_GATEWAY_URL / VITE_JAEGER_URL, then the defaults: under `npm run dev` the page's own origin
// (Vite proxies /v1 and /api), else this page's host on port 8000; Jaeger on localhost:16686.
// The API key (the gateway's TANDEM_API_KEYS) is kept in sessionStorage only: it lasts as long as
// this tab, and is sent as `Authorization: Bearer KEY` with every call to the gateway.

export interface Settings {
  gatewayUrl: string;
  jaegerUrl: string;
  apiKey: string; // "" = none (a gateway without API keys)
}

const KEY = "tandem.settings";
const API_KEY = "tandem.apiKey";

export function defaultGatewayUrl(loc: Pick<Location, "protocol" | "hostname">, dev: boolean): string {
  if (dev) return "";
  const host = loc.hostname.includes(":") ? `[${loc.hostname}]` : loc.hostname;
  return `${loc.protocol}//${host}:8000`;
}

export function servedGatewayUrl(doc: Pick<Document, "querySelector"> = document): string | undefined {
  const content = doc.querySelector('meta[name="tandem-gateway-url"]')?.getAttribute("content");
  return content ? content : undefined;
}

export function loadSettings(
  loc: Pick<Location, "protocol" | "hostname" | "search"> = window.location,
  storage: Pick<Storage, "getItem"> = window.localStorage,
  env: Record<string, string | boolean | undefined> = import.meta.env,
  served: string | undefined = servedGatewayUrl(),
  session: Pick<Storage, "getItem"> = window.sessionStorage,
): Settings {
  const query = new URLSearchParams(loc.search);
  let saved: Partial<Settings> = {};
  try {
    saved = JSON.parse(storage.getItem(KEY) ?? "{}") as Partial<Settings>;
  } catch {
    saved = {};
  }
  const text = (v: unknown) => (typeof v === "string" ? v : undefined);
  return {
    gatewayUrl:
      query.get("gateway") ??
      saved.gatewayUrl ??
      served ??
      text(env.VITE_GATEWAY_URL) ??
      defaultGatewayUrl(loc, Boolean(env.DEV)),
    jaegerUrl: query.get("jaeger") ?? saved.jaegerUrl ?? text(env.VITE_JAEGER_URL) ?? "http://localhost:16686",
    apiKey: session.getItem(API_KEY) ?? "",
  };
}

export function saveSettings(
  s: Settings,
  storage: Pick<Storage, "setItem"> = window.localStorage,
  session: Pick<Storage, "setItem"> = window.sessionStorage,
): void {
  storage.setItem(KEY, JSON.stringify({ gatewayUrl: s.gatewayUrl, jaegerUrl: s.jaegerUrl }));
  session.setItem(API_KEY, s.apiKey);
}

/** The headers that carry the API key, when there is one. */
export function authHeaders(apiKey: string): Record<string, string> {
  return apiKey.trim() ? { Authorization: `Bearer ${apiKey.trim()}` } : {};
}

export function traceUrl(jaegerUrl: string, traceId: string): string {
  return `${jaegerUrl.replace(/\/+$/, "")}/trace/${traceId}`;
}
