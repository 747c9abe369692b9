import { describe, expect, it } from "vitest";
import { SSEParser, readSSE } from "./sse";

describe("SSEParser", () => {
  it("returns each event's data, across chunk boundaries", () => {
    const parser = new SSEParser();
    expect(parser.push('data: {"a":')).toEqual([]);
    expect(parser.push('1}\n\ndata: {"b":2}\n')).toEqual(['{"a":1}']);
    expect(parser.push("\ndata: [DONE]\n\n")).toEqual(['{"b":2}', "[DONE]"]);
  });

  it("joins multi-line data, skips comments and other fields, accepts CRLF", () => {
    const parser = new SSEParser();
    expect(parser.push(": ping\r\n\r\nevent: x\r\ndata: one\r\ndata:two\r\n\r\n")).toEqual(["one\ntwo"]);
  });
});

describe("readSSE", () => {
  it("reads a byte stream split mid-character", async () => {
    const bytes = new TextEncoder().encode('data: {"t":"é"}\n\ndata: [DONE]\n\n');
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(bytes.slice(0, 13)); // inside the two bytes of "é"
        controller.enqueue(bytes.slice(13));
        controller.close();
      },
    });
    const events: string[] = [];
    for await (const data of readSSE(body)) events.push(data);
    expect(events).toEqual(['{"t":"é"}', "[DONE]"]);
  });
});
