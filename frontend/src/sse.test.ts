import { describe, expect, it } from "vitest";
import { SSEParser, sseEvents } from "./sse";
import { chunkedBody, encoder } from "./test/fakeGateway";

async function collect(body: ReadableStream<Uint8Array>): Promise<string[]> {
  const out: string[] = [];
  for await (const data of sseEvents(body)) out.push(data);
  return out;
}

const STREAM = 'data: {"a":1}\n\ndata: {"b":"x y"}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n';

describe("SSEParser", () => {
  it("parses whole events, ignoring comments", () => {
    expect(new SSEParser().push(STREAM)).toEqual(['{"a":1}', '{"b":"x y"}', "[DONE]"]);
  });

  it("gives the same events however the text is split in two", () => {
    for (let cut = 0; cut <= STREAM.length; cut++) {
      const p = new SSEParser();
      const events = [...p.push(STREAM.slice(0, cut)), ...p.push(STREAM.slice(cut))];
      expect(events, `cut at ${cut}`).toEqual(['{"a":1}', '{"b":"x y"}', "[DONE]"]);
    }
  });

  it("gives the same events when fed one character at a time", () => {
    const p = new SSEParser();
    const events = [...STREAM].flatMap((ch) => p.push(ch));
    expect(events).toEqual(['{"a":1}', '{"b":"x y"}', "[DONE]"]);
  });

  it("joins multi-line data, takes bare CR endings, drops other fields", () => {
    const p = new SSEParser();
    expect(p.push("event: x\nid: 3\ndata: one\ndata:two\r\rdata\n\n")).toEqual(["one\ntwo", ""]);
  });

  it("holds an event back until its blank line arrives", () => {
    const p = new SSEParser();
    expect(p.push("data: half")).toEqual([]);
    expect(p.push("\n")).toEqual([]);
    expect(p.push("\n")).toEqual(["half"]);
  });
});

describe("sseEvents", () => {
  it("decodes UTF-8 characters split across network chunks", async () => {
    const bytes = encoder.encode('data: {"t":"café 東京 🙂"}\n\n');
    const chunks = [...bytes].map((b) => new Uint8Array([b])); // one byte per chunk
    expect(await collect(chunkedBody(chunks))).toEqual(['{"t":"café 東京 🙂"}']);
  });

  it("drops an event cut off by the end of the stream", async () => {
    expect(await collect(chunkedBody(["data: 1\n\n", "data: 2"]))).toEqual(["1"]);
  });
});
