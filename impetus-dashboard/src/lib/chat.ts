// A streamed chat completion through /v1/chat/completions, token by token.
import { endpoints } from "../api/endpoints";
import { ApiError, apiFetch, type ErrorBody } from "./api";
import { readSSE } from "./sse";

/** The parts of a streamed chat.completion.chunk (or an in-stream error) the playground reads. */
interface StreamChunk extends ErrorBody {
  choices?: { delta?: { content?: string | null }; finish_reason?: string | null }[];
  usage?: { completion_tokens?: number | null } | null;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface SamplingParams {
  temperature: number;
  top_p: number;
  max_tokens: number;
}

export interface StreamResult {
  text: string;
  finishReason: string | null;
  completionTokens: number | null;
  ttftMs: number | null;
  tokensPerSecond: number | null;
}

export async function streamChat(
  model: string,
  messages: ChatMessage[],
  params: SamplingParams,
  onDelta: (text: string) => void,
  signal?: AbortSignal,
): Promise<StreamResult> {
  const started = performance.now();
  const response = await apiFetch(endpoints.chatCompletions, {
    method: "POST",
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...params }),
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
  const result: StreamResult = { text: "", finishReason: null, completionTokens: null, ttftMs: null, tokensPerSecond: null };
  let firstAt: number | null = null;
  let deltas = 0;
  for await (const data of readSSE(response.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data) as StreamChunk;
    if (chunk.error) throw new ApiError(500, chunk.error.message ?? "stream failed", chunk.error.code ?? null);
    const delta: string = chunk.choices?.[0]?.delta?.content ?? "";
    if (delta) {
      if (firstAt === null) {
        firstAt = performance.now();
        result.ttftMs = firstAt - started;
      }
      deltas += 1;
      result.text += delta;
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
