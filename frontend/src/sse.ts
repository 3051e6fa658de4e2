// Server-sent events as the gateway sends them: `data:` lines, events ended by a blank line.
// Bytes arrive in arbitrary chunks: a line, a line ending (\r\n) or a UTF-8 character may be split
// across two of them, so the parser keeps what it has not finished and the decoder streams.

/** Incremental parser: push text, get the data of every event it completed. */
export class SSEParser {
  private buffer = "";
  private data: string[] = [];

  push(text: string): string[] {
    this.buffer += text;
    const events: string[] = [];
    for (;;) {
      const end = this.buffer.search(/[\r\n]/);
      if (end < 0) break;
      // a \r at the very end may be the first half of \r\n: wait for the next chunk
      if (this.buffer[end] === "\r" && end === this.buffer.length - 1) break;
      const skip = this.buffer.startsWith("\r\n", end) ? 2 : 1;
      const line = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + skip);
      this.line(line, events);
    }
    return events;
  }

  private line(line: string, events: string[]): void {
    if (line === "") {
      if (this.data.length) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}

/** The data of each event in a response body, as it arrives. An event cut off by the end of the
 * stream is dropped, as the EventSource standard says. */
export async function* sseEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    yield* parser.push(decoder.decode() + "\n");
  } finally {
    reader.releaseLock();
  }
}
