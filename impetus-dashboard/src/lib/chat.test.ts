import { afterEach, describe, expect, it, vi } from "vitest";
import { chatRequestBody, streamChat, type StreamDelta } from "./chat";

afterEach(() => vi.unstubAllGlobals());

const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
  `data: ${JSON.stringify({ object: "chat.completion.chunk", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;

/** A fetch answering one SSE body, delivered in the given pieces (split anywhere), recording the request. */
function sseFetch(pieces: string[]) {
  const requests: { path: string; body: Record<string, unknown> }[] = [];
  const fn = (input: RequestInfo | URL, init: RequestInit = {}) => {
    requests.push({ path: input instanceof Request ? input.url : input.toString(), body: JSON.parse(init.body as string) as Record<string, unknown> });
    const encoder = new TextEncoder();
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const piece of pieces) controller.enqueue(encoder.encode(piece));
        controller.close();
      },
    });
    return Promise.resolve(new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  };
  return { fn, requests };
}

describe("streamChat", () => {
  it("keeps the streamed reasoning_content apart from the content", async () => {
    const stream = [
      chunk({ role: "assistant", content: "" }),
      chunk({ reasoning_content: "The user greets. " }),
      chunk({ reasoning_content: "Answer briefly." }),
      chunk({ content: "Hello" }),
      chunk({ content: " there!" }),
      chunk({}, "stop"),
      `data: ${JSON.stringify({ choices: [], usage: { completion_tokens: 7 } })}\n\n`,
      "data: [DONE]\n\n",
    ].join("");
    // Cut the wire mid-event (and mid-field) so the parser, not the chunking, decides the events.
    const fake = sseFetch([stream.slice(0, 97), stream.slice(97, 180), stream.slice(180)]);
    vi.stubGlobal("fetch", fake.fn);
    const deltas: StreamDelta[] = [];
    const result = await streamChat("m", [{ role: "user", content: "hi" }], { params: {}, thinking: null }, (d) => deltas.push(d));

    expect(result.reasoning).toBe("The user greets. Answer briefly.");
    expect(result.text).toBe("Hello there!");
    expect(result.finishReason).toBe("stop");
    expect(result.completionTokens).toBe(7);
    expect(deltas).toEqual([
      { content: "", reasoning: "The user greets. " },
      { content: "", reasoning: "Answer briefly." },
      { content: "Hello", reasoning: "" },
      { content: " there!", reasoning: "" },
    ]);
    expect(result.ttftMs).not.toBeNull(); // the first thinking token is the first token
  });

  it("reads the newer `reasoning` name too, and a model without thinking leaves it empty", async () => {
    vi.stubGlobal("fetch", sseFetch([chunk({ reasoning: "hmm" }) + chunk({ content: "ok" }) + "data: [DONE]\n\n"]).fn);
    const both = await streamChat("m", [], { params: {}, thinking: null }, () => undefined);
    expect([both.reasoning, both.text]).toEqual(["hmm", "ok"]);

    vi.stubGlobal("fetch", sseFetch([chunk({ content: "plain" }) + "data: [DONE]\n\n"]).fn);
    const plain = await streamChat("m", [], { params: {}, thinking: null }, () => undefined);
    expect([plain.reasoning, plain.text]).toEqual(["", "plain"]);
  });

  it("throws an in-stream error with the server's message", async () => {
    const error = `data: ${JSON.stringify({ error: { message: "engine failed", code: "internal_error" } })}\n\n`;
    vi.stubGlobal("fetch", sseFetch([chunk({ reasoning_content: "x" }) + error]).fn);
    await expect(streamChat("m", [], { params: {}, thinking: null }, () => undefined)).rejects.toThrow("engine failed");
  });
});

describe("chatRequestBody", () => {
  const messages = [
    { role: "user" as const, content: "q" },
    { role: "assistant" as const, content: "a", reasoning: "thought" },
  ];

  it("sends chat_template_kwargs.enable_thinking only when the switch is set", () => {
    expect(chatRequestBody("m", messages, { params: {}, thinking: null })).not.toHaveProperty("chat_template_kwargs");
    expect(chatRequestBody("m", messages, { params: {}, thinking: false }).chat_template_kwargs).toEqual({ enable_thinking: false });
    expect(chatRequestBody("m", messages, { params: {}, thinking: true }).chat_template_kwargs).toEqual({ enable_thinking: true });
  });

  it("sends only the sampling fields the user set, and never the reasoning back", () => {
    const body = chatRequestBody("m", messages, { params: { temperature: 0, top_p: undefined, max_tokens: 9 }, thinking: null });
    expect(body).toMatchObject({ model: "m", stream: true, temperature: 0, max_tokens: 9 });
    expect(body).not.toHaveProperty("top_p");
    expect(body.messages).toEqual([{ role: "user", content: "q" }, { role: "assistant", content: "a" }]);
  });

  it("sends an attached image as an image_url part before the text", () => {
    const image = "data:image/png;base64,iVBORw0KGgo=";
    const body = chatRequestBody("m", [{ role: "user", content: "What is this?", image }], { params: {}, thinking: null });
    expect(body.messages).toEqual([
      { role: "user", content: [{ type: "image_url", image_url: { url: image } }, { type: "text", text: "What is this?" }] },
    ]);
  });
});
