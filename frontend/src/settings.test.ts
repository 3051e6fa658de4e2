import { describe, expect, it } from "vitest";
import { toParams, DEFAULT_FIELDS } from "./params";
import { authHeaders, defaultGatewayUrl, loadSettings, saveSettings, traceUrl } from "./settings";

const LOC = { protocol: "http:", hostname: "10.1.2.3", search: "" };
const store = (v: object | null) => ({ getItem: () => (v === null ? null : JSON.stringify(v)) });
const NO_KEY = { getItem: () => null };

describe("settings", () => {
  it("defaults to this page's host on port 8000, or the page's origin under the dev server", () => {
    expect(defaultGatewayUrl(LOC, false)).toBe("http://10.1.2.3:8000");
    expect(defaultGatewayUrl({ protocol: "http:", hostname: "::1" }, false)).toBe("http://[::1]:8000");
    expect(defaultGatewayUrl(LOC, true)).toBe("");
    expect(loadSettings(LOC, store(null), {}, undefined, NO_KEY)).toEqual({
      gatewayUrl: "http://10.1.2.3:8000",
      jaegerUrl: "http://localhost:16686",
      apiKey: "",
    });
  });

  it("takes the query over saved settings over the served meta tag over the build's variables", () => {
    const env = { VITE_GATEWAY_URL: "http://built:1", VITE_JAEGER_URL: "http://j-built" };
    expect(loadSettings(LOC, store(null), env, undefined, NO_KEY)).toEqual({
      gatewayUrl: "http://built:1",
      jaegerUrl: "http://j-built",
      apiKey: "",
    });
    expect(loadSettings(LOC, store(null), env, "http://served:4").gatewayUrl).toBe("http://served:4");
    const saved = store({ gatewayUrl: "http://saved:2" });
    expect(loadSettings(LOC, saved, env, "http://served:4").gatewayUrl).toBe("http://saved:2");
    expect(loadSettings(LOC, saved, env).gatewayUrl).toBe("http://saved:2");
    const q = { ...LOC, search: "?gateway=http://q:3&jaeger=http://jq" };
    expect(loadSettings(q, saved, env, undefined, NO_KEY)).toEqual({
      gatewayUrl: "http://q:3",
      jaegerUrl: "http://jq",
      apiKey: "",
    });
  });

  it("keeps the API key for this tab only (sessionStorage), never with the saved URLs", () => {
    const local = new Map<string, string>();
    const session = new Map<string, string>();
    const wrap = (m: Map<string, string>) => ({
      getItem: (k: string) => m.get(k) ?? null,
      setItem: (k: string, v: string) => void m.set(k, v),
    });
    saveSettings({ gatewayUrl: "http://g:1", jaegerUrl: "http://j:2", apiKey: "sk-secret" }, wrap(local), wrap(session));
    expect([...local.values()].join()).not.toContain("sk-secret");
    expect(loadSettings(LOC, wrap(local), {}, undefined, wrap(session))).toEqual({
      gatewayUrl: "http://g:1",
      jaegerUrl: "http://j:2",
      apiKey: "sk-secret",
    });
    expect(authHeaders(" sk-secret ")).toEqual({ Authorization: "Bearer sk-secret" });
    expect(authHeaders("")).toEqual({});
  });

  it("links a trace under the Jaeger URL", () => {
    expect(traceUrl("http://j:16686/", "abc")).toBe("http://j:16686/trace/abc");
  });
});

describe("toParams", () => {
  it("sends what the form says, leaving out empty optional fields", () => {
    expect(toParams(DEFAULT_FIELDS)).toEqual({
      prompt: DEFAULT_FIELDS.prompt,
      max_tokens: 64,
      temperature: 1,
      top_p: 1,
      top_k: -1,
    });
    const f = { ...DEFAULT_FIELDS, seed: "5", stop: "a\n\nb", ignoreEos: true, temperature: "1000" };
    expect(toParams(f)).toMatchObject({ seed: 5, stop: ["a", "b"], ignore_eos: true, temperature: 1000 });
  });

  it("refuses an empty prompt and malformed numbers, naming the field", () => {
    expect(() => toParams({ ...DEFAULT_FIELDS, prompt: "  " })).toThrow("Enter some input text first.");
    expect(() => toParams({ ...DEFAULT_FIELDS, topK: "2.5" })).toThrow('Top-k must be a whole number, got "2.5"');
    expect(() => toParams({ ...DEFAULT_FIELDS, topP: "x" })).toThrow('Top-p must be a number, got "x"');
  });
});
