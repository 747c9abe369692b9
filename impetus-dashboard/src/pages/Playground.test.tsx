import { fireEvent, screen, waitFor } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { Preset, PresetList } from "../lib/presets";
import type { ModelList } from "../lib/types";
import { renderWithMantine } from "../test/render";
import { Playground } from "./Playground";

afterEach(() => vi.unstubAllGlobals());

const card = (id: string, context_length: number | null) => ({
  id, object: "model" as const, created: 0, owned_by: "impetus", context_length, kind: "language" as const,
  capabilities: ["chat.completions"], embedding_method: "", dimensions: null, matryoshka: false,
  preset: null, base_model: null,
});
const models: ModelList = { object: "list", data: [card("tiny", 2048), card("coder", 8192)] };
const coder: Preset = {
  name: "coder", model: "tiny", system: "You write code.", parameters: { temperature: 0.2, max_tokens: 64 },
  chat_template_kwargs: { enable_thinking: false }, context_length: 8192,
};

/** JSON for the GETs; for the chat, an SSE stream held open until `release()` so the test sees it mid-stream. */
function fakeServer(presets: Preset[] = [], list: ModelList = models) {
  const chats: Record<string, unknown>[] = [];
  let release = () => undefined as void;
  const encoder = new TextEncoder();
  const sse = (delta: Record<string, unknown>, finish: string | null = null) =>
    encoder.encode(`data: ${JSON.stringify({ choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`);
  const fn = (input: RequestInfo | URL, init: RequestInit = {}) => {
    const path = input instanceof Request ? input.url : input.toString();
    const json = (body: unknown) =>
      Promise.resolve(new Response(JSON.stringify(body), { status: 200, headers: { "Content-Type": "application/json" } }));
    if (path === "/v1/models") return json(list);
    if (path === "/api/presets") return json({ presets } satisfies PresetList);
    chats.push(JSON.parse(init.body as string) as Record<string, unknown>);
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(sse({ role: "assistant", reasoning_content: "Greeting: " }));
        controller.enqueue(sse({ reasoning_content: "reply in kind." }));
        release = () => {
          controller.enqueue(sse({ content: "Hello!" }));
          controller.enqueue(sse({}, "stop"));
          controller.enqueue(encoder.encode("data: [DONE]\n\n"));
          controller.close();
        };
      },
    });
    return Promise.resolve(new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  };
  return { fn, chats, release: () => release() };
}

function send(text: string) {
  fireEvent.change(screen.getByTestId("chat-input"), { target: { value: text } });
  fireEvent.click(screen.getByTestId("chat-send"));
}

describe("Playground", () => {
  it("shows the thinking apart from the answer: open while it streams, collapsed after, reopened on a click", async () => {
    const server = fakeServer();
    vi.stubGlobal("fetch", server.fn);
    renderWithMantine(<Playground />);
    await waitFor(() => expect(screen.getByTestId<HTMLInputElement>("chat-model").value).toBe("tiny"));
    expect(screen.getByTestId("chat-context").textContent).toContain("2,048 tokens");

    send("hi");
    const thinking = await screen.findByTestId("reasoning");
    await waitFor(() => expect(screen.getByTestId("reasoning-text").textContent).toBe("Greeting: reply in kind."));
    expect(thinking.getAttribute("data-open")).toBe("true");
    expect(server.chats[0]).not.toHaveProperty("chat_template_kwargs"); // left at "model default"

    server.release();
    await screen.findByTestId("chat-stats");
    const reply = screen.getAllByTestId("message-assistant").at(-1)!;
    expect(reply.querySelector('[data-testid="message-content"]')!.textContent).toBe("Hello!");
    expect(reply.querySelector('[data-testid="reasoning"]')!.getAttribute("data-open")).toBe("false");
    expect(reply.querySelector('[data-testid="reasoning-text"]')).toBeNull();
    expect(reply.querySelector('[data-testid="reasoning-length"]')!.textContent).toContain("4 words, 24 characters");

    fireEvent.click(reply.querySelector('[data-testid="reasoning-toggle"]')!);
    expect(reply.querySelector('[data-testid="reasoning-text"]')!.textContent).toBe("Greeting: reply in kind.");
  });

  it("sends enable_thinking when the switch is set, and a preset's name with only the values typed", async () => {
    const server = fakeServer([coder]);
    vi.stubGlobal("fetch", server.fn);
    renderWithMantine(<Playground />);
    await waitFor(() => expect(screen.getByTestId<HTMLInputElement>("chat-model").value).toBe("tiny"));

    fireEvent.click(await screen.findByTestId("chat-preset"));
    fireEvent.click(await screen.findByRole("option", { name: "coder (tiny)", hidden: true }));
    await waitFor(() => expect(screen.getByTestId<HTMLInputElement>("chat-model").value).toBe("coder"));
    expect(screen.getByTestId<HTMLInputElement>("temperature").placeholder).toBe("preset: 0.2");
    expect(screen.getByTestId<HTMLInputElement>("max-tokens").placeholder).toBe("preset: 64");
    expect(screen.getByTestId<HTMLTextAreaElement>("system-prompt").placeholder).toBe("preset: You write code.");
    expect(screen.getByTestId("chat-context").getAttribute("data-context")).toBe("8192");

    fireEvent.change(screen.getByTestId("max-tokens"), { target: { value: "12" } });
    fireEvent.click(screen.getByText("On"));
    send("hi");
    await waitFor(() => expect(server.chats).toHaveLength(1));
    server.release();
    await screen.findByTestId("chat-stats");
    const body = server.chats[0];
    expect(body).toMatchObject({ model: "coder", max_tokens: 12, chat_template_kwargs: { enable_thinking: true } });
    expect(body).not.toHaveProperty("temperature"); // the preset's applies on the server
    expect(body.messages).toEqual([{ role: "user", content: "hi" }]); // no system message: the preset's is used
  });

  it("offers an image only for a vision model, and sends it as an image_url part", async () => {
    const eye = { ...card("eye", 4096), capabilities: ["chat.completions", "vision"] };
    const server = fakeServer([], { object: "list", data: [card("tiny", 2048), eye] });
    vi.stubGlobal("fetch", server.fn);
    renderWithMantine(<Playground />);
    await waitFor(() => expect(screen.getByTestId<HTMLInputElement>("chat-model").value).toBe("tiny"));
    expect(screen.queryByTestId("chat-attach")).toBeNull(); // a text model: no image

    fireEvent.click(screen.getByTestId("chat-model"));
    fireEvent.click(await screen.findByRole("option", { name: "eye", hidden: true }));
    await screen.findByTestId("chat-attach");
    const png = new File([new Uint8Array([137, 80, 78, 71])], "cat.png", { type: "image/png" });
    fireEvent.change(document.querySelector('input[type="file"]')!, { target: { files: [png] } });
    expect((await screen.findByTestId("chat-image")).textContent).toContain("cat.png");

    send("What is this?");
    await waitFor(() => expect(server.chats).toHaveLength(1));
    expect(server.chats[0].messages).toEqual([
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: [{ type: "image_url", image_url: { url: "data:image/png;base64,iVBORw==" } }, { type: "text", text: "What is this?" }] },
    ]);
    expect(screen.queryByTestId("chat-image")).toBeNull(); // sent with the message, shown in its bubble
    expect(screen.getByTestId("message-image").getAttribute("src")).toBe("data:image/png;base64,iVBORw==");
    server.release();
    await screen.findByTestId("chat-stats");
  });
});
