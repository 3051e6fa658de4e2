import { act, cleanup, render, screen, waitFor, within } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { App } from "./App";
import {
  NODES,
  chunkedBody,
  finishChunk,
  jsonResponse,
  openBody,
  openaiError,
  sse,
  streamResponse,
  tokenChunk,
  usageChunk,
} from "./test/fakeGateway";

type Handler = (url: string, init: RequestInit) => Promise<Response>;

function gateway(completions: Handler) {
  const calls: { url: string; body: unknown }[] = [];
  const fetchMock = vi.fn(async (url: string, init: RequestInit = {}) => {
    calls.push({ url, body: init.body ? JSON.parse(init.body as string) : undefined });
    if (url.endsWith("/api/nodes")) return jsonResponse(200, NODES);
    if (url.endsWith("/v1/completions")) return completions(url, init);
    return jsonResponse(404, { detail: "no such route" });
  });
  vi.stubGlobal("fetch", fetchMock);
  return calls;
}

beforeEach(() => {
  window.localStorage.clear();
  window.history.replaceState(null, "", "/?gateway=http://gw.test:8000&jaeger=http://jaeger.test:16686");
});
afterEach(() => {
  cleanup();
  vi.unstubAllGlobals();
});

describe("App", () => {
  it("labels every control", () => {
    gateway(async () => jsonResponse(500, {}));
    render(<App />);
    for (const label of ["Input text", "Max tokens", "Temperature", "Top-p", "Top-k", "Seed", "Stop sequences"]) {
      expect(screen.getByLabelText(label)).toBeTruthy();
    }
    expect(screen.getByLabelText(/Ignore end of text/)).toBeTruthy();
    expect(screen.getByLabelText("Gateway URL")).toBeTruthy();
    expect(screen.getByLabelText("Jaeger URL")).toBeTruthy();
    expect(screen.getByRole("button", { name: "Process Input" })).toBeTruthy();
    expect(screen.getByRole("button", { name: "Stop" })).toHaveProperty("disabled", true);
  });

  it("names the served model and its stages once the gateway answers", async () => {
    gateway(async () => jsonResponse(500, {}));
    render(<App />);
    expect(screen.getByTestId("subtitle").textContent).toBe(
      "A language model as a pipeline of stage functions: watch a request go through it.",
    );
    await waitFor(() =>
      expect(screen.getByTestId("subtitle").textContent).toBe(
        "gpt2 as a pipeline of 3 stage functions: watch a request go through it.",
      ),
    );
  });

  it("streams the output, fills the metrics, stage times and trace link", async () => {
    const body = sse(
      tokenChunk(" one"),
      tokenChunk(" two"),
      tokenChunk(" three"),
      finishChunk("length"),
      usageChunk(4, 3, { "stage-1": 2.5, "stage-2": 3.5, "stage-3": 4.5 }),
      "[DONE]",
    );
    const calls = gateway(async () => streamResponse(chunkedBody([body]), "f".repeat(32)));
    const user = userEvent.setup();
    render(<App />);
    const prompt = screen.getByLabelText("Input text");
    await user.clear(prompt);
    await user.type(prompt, "Hello there");
    await user.clear(screen.getByLabelText("Max tokens"));
    await user.type(screen.getByLabelText("Max tokens"), "3");
    await user.type(screen.getByLabelText("Seed"), "7");
    await user.type(screen.getByLabelText("Stop sequences"), "END{Enter}STOP");
    await user.click(screen.getByRole("button", { name: "Process Input" }));
    await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/Finished \(length\)/));
    const polls = () => calls.filter((c) => c.url.endsWith("/api/nodes")).length;
    const atEnd = polls();
    await waitFor(() => expect(polls()).toBe(atEnd + 1)); // asked again at once, not 2 s later
    expect(screen.getByTestId("output").textContent).toBe(" one two three");
    expect(screen.getByTestId("metric-generated").textContent).toBe("3");
    expect(screen.getByTestId("metric-prompt").textContent).toBe("4");
    expect(screen.getByTestId("metric-ttft").textContent).toMatch(/ms|s$/);
    expect(screen.getByTestId("stage-time-stage-2").textContent).toContain("3.5 ms");
    const link = screen.getByTestId("trace-link") as HTMLAnchorElement;
    expect(link.href).toBe(`http://jaeger.test:16686/trace/${"f".repeat(32)}`);
    const sent = calls.find((c) => c.url === "http://gw.test:8000/v1/completions");
    expect(sent?.body).toMatchObject({
      prompt: "Hello there",
      max_tokens: 3,
      seed: 7,
      stop: ["END", "STOP"],
      stream: true,
    });
  });

  it("Stop aborts the stream and says so", async () => {
    let closed: Promise<void> = Promise.resolve();
    gateway(async (_url, init) => {
      const open = openBody(sse(tokenChunk("a"), tokenChunk("b")), init.signal as AbortSignal);
      closed = open.closed;
      return streamResponse(open.body);
    });
    const user = userEvent.setup();
    render(<App />);
    await user.click(screen.getByRole("button", { name: "Process Input" }));
    await waitFor(() => expect(screen.getByTestId("output").textContent).toBe("ab"));
    const stop = screen.getByRole("button", { name: "Stop" });
    expect(stop).toHaveProperty("disabled", false);
    await user.click(stop);
    await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/^Stopped after 2 tokens/));
    await closed;
    expect(screen.queryByTestId("error")).toBeNull();
    expect(screen.getByRole("button", { name: "Process Input" })).toHaveProperty("disabled", false);
  });

  it("runs with Ctrl+Enter and stops with Escape from the keyboard", async () => {
    gateway(async (_url, init) => streamResponse(openBody(sse(tokenChunk("x")), init.signal as AbortSignal).body));
    const user = userEvent.setup();
    render(<App />);
    await user.click(screen.getByLabelText("Input text"));
    await user.keyboard("{Control>}{Enter}{/Control}");
    await waitFor(() => expect(screen.getByTestId("output").textContent).toBe("x"));
    await user.keyboard("{Escape}");
    await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/^Stopped/));
  });

  it("shows the gateway's reason when it refuses a parameter", async () => {
    gateway(async () =>
      jsonResponse(400, openaiError("temperature must be between 0 and 100, got 1000.0", "temperature", 400)),
    );
    const user = userEvent.setup();
    render(<App />);
    const t = screen.getByLabelText("Temperature");
    await user.clear(t);
    await user.type(t, "1000");
    await user.click(screen.getByRole("button", { name: "Process Input" }));
    const alert = await screen.findByRole("alert");
    expect(alert.textContent).toBe(
      "The gateway refused the request (400): temperature must be between 0 and 100, got 1000.0 (parameter: temperature)",
    );
    expect(screen.getByText("Metrics appear once a request runs.")).toBeTruthy();
    expect(screen.queryByTestId("metric-ttft")).toBeNull();
  });

  it("refuses a malformed field before sending anything", async () => {
    const calls = gateway(async () => jsonResponse(500, {}));
    const user = userEvent.setup();
    render(<App />);
    await user.clear(screen.getByLabelText("Max tokens"));
    await user.click(screen.getByRole("button", { name: "Process Input" }));
    expect((await screen.findByRole("alert")).textContent).toBe('Max tokens must be a whole number, got ""');
    expect(calls.some((c) => c.url.endsWith("/v1/completions"))).toBe(false);
  });

  it("shows node health for every stage and refreshes it", async () => {
    vi.useFakeTimers({ shouldAdvanceTime: true });
    try {
      const calls = gateway(async () => jsonResponse(500, {}));
      render(<App nodesIntervalMs={1000} />);
      for (const stage of NODES.stages) {
        const item = await screen.findByTestId(`node-${stage.name}`);
        expect(within(item).getByText("up")).toBeTruthy();
      }
      expect(screen.getByTestId("kv-stage-3").textContent).toContain("2 sequences, 4.0 KiB of 1.0 GiB");
      const polls = () => calls.filter((c) => c.url === "http://gw.test:8000/api/nodes").length;
      const before = polls();
      await act(async () => {
        await vi.advanceTimersByTimeAsync(2100);
      });
      expect(polls()).toBeGreaterThanOrEqual(before + 2);
    } finally {
      vi.useRealTimers();
    }
  });
});
