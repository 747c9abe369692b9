// A streamed chat completion through /v1/chat/completions, token by token, with the model's thinking
// (`delta.reasoning_content`, vLLM's, llama-server's and mlx_lm.server's field) kept apart from the answer.
import { endpoints } from "../api/endpoints";
import { ApiError, apiFetch, type ErrorBody } from "./api";
import { readSSE } from "./sse";

/** The delta fields the playground reads: the answer, and the thinking under vLLM's name (or the newer `reasoning`). */
interface Delta {
  content?: string | null;
  reasoning_content?: string | null;
  reasoning?: string | null;
}

/** The parts of a streamed chat.completion.chunk (or an in-stream error) the playground reads. */
interface StreamChunk extends ErrorBody {
  choices?: { delta?: Delta; finish_reason?: string | null }[];
  usage?: { completion_tokens?: number | null } | null;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
  /** A user message's attached image, a data: URL, sent as an OpenAI `image_url` part (vision models only). */
  image?: string;
  /** An assistant reply's thinking: shown apart, never sent back (templates drop it from history anyway). */
  reasoning?: string;
}

/** Sampling fields the user set; one left undefined is not sent, so the preset's or the server's default applies. */
export interface SamplingParams {
  temperature?: number;
  top_p?: number;
  max_tokens?: number;
}

/** What the request asks beyond the messages. `thinking` null: the template's own default (nothing sent). */
export interface ChatOptions {
  params: SamplingParams;
  thinking: boolean | null;
}

/** One chunk's text: what it adds to the answer and to the thinking. */
export interface StreamDelta {
  content: string;
  reasoning: string;
}

export interface StreamResult {
  text: string;
  reasoning: string;
  finishReason: string | null;
  completionTokens: number | null;
  ttftMs: number | null;
  tokensPerSecond: number | null;
}

/** The request body: only the fields the user set; `chat_template_kwargs` only when thinking was switched. */
export function chatRequestBody(model: string, messages: ChatMessage[], options: ChatOptions): Record<string, unknown> {
  const body: Record<string, unknown> = {
    model,
    messages: messages.map(({ role, content, image }) =>
      image
        ? { role, content: [{ type: "image_url", image_url: { url: image } }, { type: "text", text: content }] }
        : { role, content },
    ),
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const [name, value] of Object.entries(options.params)) {
    if (typeof value === "number" && Number.isFinite(value)) body[name] = value;
  }
  if (options.thinking !== null) body.chat_template_kwargs = { enable_thinking: options.thinking };
  return body;
}

/** A chunk's answer and thinking text (empty strings when it carries neither, e.g. the usage chunk). */
export function chunkDelta(chunk: StreamChunk): StreamDelta {
  const delta = chunk.choices?.[0]?.delta;
  return { content: delta?.content ?? "", reasoning: delta?.reasoning_content ?? delta?.reasoning ?? "" };
}

export async function streamChat(
  model: string,
  messages: ChatMessage[],
  options: ChatOptions,
  onDelta: (delta: StreamDelta) => void,
  signal?: AbortSignal,
): Promise<StreamResult> {
  const started = performance.now();
  const response = await apiFetch(endpoints.chatCompletions, {
    method: "POST",
    body: JSON.stringify(chatRequestBody(model, messages, options)),
    signal,
  });
  if (!response.ok || !response.body) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = ((await response.json()) as ErrorBody).error?.message ?? message;
    } catch {
      /* keep the status line */
    }
    throw new ApiError(response.status, message);
  }
  const result: StreamResult = {
    text: "", reasoning: "", finishReason: null, completionTokens: null, ttftMs: null, tokensPerSecond: null,
  };
  let firstAt: number | null = null;
  let deltas = 0;
  for await (const data of readSSE(response.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data) as StreamChunk;
    if (chunk.error) throw new ApiError(500, chunk.error.message ?? "stream failed", chunk.error.code ?? null);
    const delta = chunkDelta(chunk);
    if (delta.content || delta.reasoning) {
      if (firstAt === null) {
        firstAt = performance.now(); // thinking tokens are tokens: the first of either kind
        result.ttftMs = firstAt - started;
      }
      deltas += 1;
      result.text += delta.content;
      result.reasoning += delta.reasoning;
      onDelta(delta);
    }
    result.finishReason = chunk.choices?.[0]?.finish_reason ?? result.finishReason;
    if (chunk.usage?.completion_tokens != null) result.completionTokens = chunk.usage.completion_tokens;
  }
  if (firstAt !== null) {
    const seconds = (performance.now() - firstAt) / 1000;
    const tokens = result.completionTokens ?? deltas;
    result.tokensPerSecond = seconds > 0 && tokens > 1 ? (tokens - 1) / seconds : null;
  }
  return result;
}
