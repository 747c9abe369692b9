// The npm clients a JavaScript user points at the server: OpenAI's official `openai` package and the
// Vercel AI SDK (`ai` + `@ai-sdk/openai`). Run by tests/clients/test_node_clients.py, which starts the
// real server and passes its address in IMPETUS_BASE_URL (e.g. http://127.0.0.1:8080/v1) and the
// model id in IMPETUS_MODEL.
import assert from "node:assert/strict";
import { test } from "node:test";

import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, streamText } from "ai";
import OpenAI from "openai";
import { z } from "zod";

const baseURL = process.env.IMPETUS_BASE_URL;
const model = process.env.IMPETUS_MODEL ?? "smollm2-135m-instruct";
assert.ok(baseURL, "IMPETUS_BASE_URL must name the server's /v1 address");

const openai = new OpenAI({ baseURL, apiKey: "not-needed", maxRetries: 0, timeout: 120_000 });
// .chat(): chat completions, what every OpenAI-compatible server speaks (the provider's default
// model factory uses the Responses API).
const provider = createOpenAI({ baseURL, apiKey: "not-needed" });

test("openai: chat completion", async () => {
  const reply = await openai.chat.completions.create({
    model,
    messages: [{ role: "user", content: "Say hello to Ada." }],
    max_tokens: 16,
    temperature: 0,
  });
  assert.equal(reply.object, "chat.completion");
  assert.equal(reply.model, model);
  assert.ok(reply.choices[0].message.content.length > 0);
  assert.ok(["stop", "length"].includes(reply.choices[0].finish_reason));
  assert.equal(reply.usage.completion_tokens > 0, true);
});

test("openai: streamed chat completion with usage", async () => {
  const stream = await openai.chat.completions.create({
    model,
    messages: [{ role: "user", content: "Count from one to five." }],
    max_tokens: 16,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  const deltas = [];
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      if (choice.delta?.content) deltas.push(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  assert.ok(deltas.length > 1, "the answer came in one piece, not streamed");
  assert.ok(["stop", "length"].includes(finish));
  assert.ok(usage && usage.completion_tokens > 0);
});

test("ai: generateText", async () => {
  const { text, finishReason, usage } = await generateText({
    model: provider.chat(model),
    prompt: "Say hello to Ada.",
    maxOutputTokens: 16,
    temperature: 0,
    maxRetries: 0,
  });
  assert.ok(text.length > 0);
  assert.ok(["stop", "length"].includes(finishReason));
  assert.ok(usage.outputTokens > 0);
});

test("ai: streamText", async () => {
  const result = streamText({
    model: provider.chat(model),
    prompt: "Count from one to five.",
    maxOutputTokens: 16,
    temperature: 0,
    maxRetries: 0,
    onError: ({ error }) => { throw error; },
  });
  const parts = [];
  for await (const part of result.textStream) parts.push(part);
  assert.ok(parts.length > 1, "the answer came in one piece, not streamed");
  assert.equal(parts.join(""), await result.text);
});

test("ai: generateObject with a zod schema", async () => {
  const { object, finishReason } = await generateObject({
    model: provider.chat(model),
    schema: z.object({ name: z.string(), age: z.number().int() }),
    prompt: "Invent a person: a name and an age.",
    maxOutputTokens: 64,
    temperature: 0,
    maxRetries: 0,
  });
  // generateObject already validated the object against the schema; a strict schema allows no more keys.
  assert.equal(finishReason, "stop");
  assert.deepEqual(Object.keys(object).sort(), ["age", "name"]);
  assert.equal(typeof object.name, "string");
  assert.ok(Number.isInteger(object.age));
});
