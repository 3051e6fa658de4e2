import { cleanup, render, screen, waitFor } from "@testing-library/react";
import userEvent from "@testing-library/user-event";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { App } from "./App";
import {
  NODES,
  chatFinishChunk,
  chunkedBody,
  deltaChunk,
  jsonResponse,
  openBody,
  openaiError,
  roleChunk,
  sse,
  streamResponse,
  tokenChunk,
  finishChunk,
  usageChunk,
} from "./test/fakeGateway";

type Handler = (url: string, init: RequestInit) => Promise<Response>;
interface Call {
  url: string;
  body: unknown;
  auth: string | undefined;
}

function gateway(chat: Handler, nodes: object = NODES, completions?: Handler) {
  const calls: Call[] = [];
  vi.stubGlobal(
    "fetch",
    vi.fn(async (url: string, init: RequestInit = {}) => {
      const auth = (init.headers as Record<string, string> | undefined)?.Authorization;
      calls.push({ url, body: init.body ? JSON.parse(init.body as string) : undefined, auth });
      if (url.endsWith("/api/nodes")) return jsonResponse(200, nodes);
      if (url.endsWith("/v1/chat/completions")) return chat(url, init);
      if (url.endsWith("/v1/completions") && completions) return completions(url, init);
      return jsonResponse(404, { detail: "no such route" });
    }),
  );
  return calls;
}

function answer(...words: string[]): Response {
  const body = sse(roleChunk(), ...words.map(deltaChunk), chatFinishChunk("length"), usageChunk(7, words.length, { "stage-1": 1 }), "[DONE]");
  return streamResponse(chunkedBody([body]), "c".repeat(32));
}

async function openChat() {
  const user = userEvent.setup();
  render(<App />);
  await user.click(screen.getByRole("tab", { name: "Chat" }));
  return user;
}

async function say(user: ReturnType<typeof userEvent.setup>, text: string) {
  await user.type(screen.getByLabelText("Message"), text);
  await user.click(screen.getByRole("button", { name: "Send" }));
}

beforeEach(() => {
  window.localStorage.clear();
  window.sessionStorage.clear();
  window.history.replaceState(null, "", "/?gateway=http://gw.test:8000&jaeger=http://jaeger.test:16686");
});
afterEach(() => {
  cleanup();
  vi.unstubAllGlobals();
});

describe("Chat view", () => {
  it("holds a three-turn conversation, sending the whole history each turn, with metrics", async () => {
    let n = 0;
    const calls = gateway(async () => {
      n += 1;
      return answer(` answer${n}`, " more");
    });
    const user = await openChat();
    await user.type(screen.getByLabelText("System message"), "Be brief.");
    for (const text of ["first", "second", "third"]) {
      await say(user, text);
      await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/^Finished \(length\) after 2 tokens/));
    }
    const turns = screen.getAllByTestId(/^turn-/).map((t) => t.textContent);
    expect(turns).toEqual([
      "Youfirst",
      "Model answer1 more",
      "Yousecond",
      "Model answer2 more",
      "Youthird",
      "Model answer3 more",
    ]);
    const sent = calls.filter((c) => c.url === "http://gw.test:8000/v1/chat/completions").map((c) => c.body);
    expect(sent).toHaveLength(3);
    expect(sent[2]).toMatchObject({
      messages: [
        { role: "system", content: "Be brief." },
        { role: "user", content: "first" },
        { role: "assistant", content: " answer1 more" },
        { role: "user", content: "second" },
        { role: "assistant", content: " answer2 more" },
        { role: "user", content: "third" },
      ],
      max_tokens: 64,
      stream: true,
    });
    expect(screen.getByTestId("metric-generated").textContent).toBe("2");
    expect(screen.getByTestId("metric-prompt").textContent).toBe("7");
    expect(screen.getByTestId("stage-time-stage-1").textContent).toContain("1.0 ms");
    expect((screen.getByTestId("trace-link") as HTMLAnchorElement).href).toBe(
      `http://jaeger.test:16686/trace/${"c".repeat(32)}`,
    );
    expect((screen.getByLabelText("Message") as HTMLTextAreaElement).value).toBe("");
    await user.click(screen.getByRole("button", { name: "New conversation" }));
    expect(screen.queryAllByTestId(/^turn-/)).toHaveLength(0);
  });

  it("Stop ends the answer where it is and marks it stopped", async () => {
    let closed: Promise<void> = Promise.resolve();
    gateway(async (_url, init) => {
      const open = openBody(sse(roleChunk(), deltaChunk("par"), deltaChunk("tial")), init.signal as AbortSignal);
      closed = open.closed;
      return streamResponse(open.body);
    });
    const user = await openChat();
    await say(user, "go on");
    await waitFor(() => expect(screen.getByTestId("answer").textContent).toBe("partial"));
    expect(screen.getByRole("tab", { name: "Completion" })).toHaveProperty("disabled", true);
    await user.click(screen.getByRole("button", { name: "Stop" }));
    await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/^Stopped after 2 tokens/));
    await closed;
    expect(screen.getByTestId("turn-1").textContent).toBe("Modelpartialstopped");
    expect(screen.getByRole("button", { name: "Send" })).toHaveProperty("disabled", false);
  });

  it("a refused turn is taken back, its text returned to the box, the reason shown", async () => {
    gateway(async () => jsonResponse(400, openaiError("this model has no chat template", "messages", 400)));
    const user = await openChat();
    await say(user, "hello");
    const alert = await screen.findByRole("alert");
    expect(alert.textContent).toContain("this model has no chat template");
    expect(screen.queryAllByTestId(/^turn-/)).toHaveLength(0);
    expect((screen.getByLabelText("Message") as HTMLTextAreaElement).value).toBe("hello");
  });

  it("sends the API key from Settings with every call to the gateway", async () => {
    const calls = gateway(async () => answer("ok"));
    const user = await openChat();
    await user.click(screen.getByText("Settings"));
    await user.type(screen.getByLabelText("API key"), "sk-test-key-0123456789");
    await user.click(screen.getByRole("button", { name: "Save settings" }));
    await say(user, "hi");
    await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/^Finished/));
    const chat = calls.find((c) => c.url.endsWith("/v1/chat/completions"));
    expect(chat?.auth).toBe("Bearer sk-test-key-0123456789");
    await waitFor(() => expect(calls.filter((c) => c.url.endsWith("/api/nodes")).at(-1)?.auth).toBe("Bearer sk-test-key-0123456789"));
    expect(window.localStorage.getItem("tandem.settings")).not.toContain("sk-test");
  });

  it("links no trace when the gateway does not trace", async () => {
    const body = sse(tokenChunk("x"), finishChunk("length"), usageChunk(1, 1), "[DONE]");
    gateway(async () => answer("ok"), { ...NODES, tracing: false }, async () => streamResponse(chunkedBody([body]), "d".repeat(32)));
    const user = userEvent.setup();
    render(<App />);
    await screen.findByTestId("node-stage-1");
    await user.click(screen.getByRole("button", { name: "Process Input" }));
    await waitFor(() => expect(screen.getByTestId("status").textContent).toMatch(/^Finished/));
    expect(screen.queryByTestId("trace-link")).toBeNull();
    expect(screen.getByTestId("trace-hint").textContent).toContain("Tracing is off on the gateway");
  });
});
