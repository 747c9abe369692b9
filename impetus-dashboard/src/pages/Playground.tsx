// Chat with a model, tokens streamed through /v1/chat/completions (SSE over fetch).
import {
  Alert,
  Button,
  Grid,
  Group,
  NumberInput,
  Paper,
  ScrollArea,
  Select,
  Slider,
  Stack,
  Text,
  Textarea,
  Title,
} from "@mantine/core";
import { useEffect, useRef, useState } from "react";
import { endpoints } from "../api/endpoints";
import { streamChat, type ChatMessage, type SamplingParams, type StreamResult } from "../lib/chat";
import { formatNumber } from "../lib/format";
import type { ModelList } from "../lib/types";
import { useApi } from "../lib/useApi";

function Bubble({ message, streaming }: { message: ChatMessage; streaming?: boolean }) {
  const user = message.role === "user";
  return (
    <Group justify={user ? "flex-end" : "flex-start"}>
      <Paper
        p="sm"
        radius="md"
        maw="85%"
        bg={user ? "var(--mantine-color-blue-light)" : "var(--mantine-color-default-hover)"}
        data-testid={user ? "message-user" : "message-assistant"}
        data-streaming={streaming ? "true" : "false"}
      >
        <Text size="sm" style={{ whiteSpace: "pre-wrap" }}>
          {message.content || (streaming ? "…" : "")}
        </Text>
      </Paper>
    </Group>
  );
}

export function Playground() {
  const models = useApi<ModelList>(endpoints.openaiModels, 15000);
  const [model, setModel] = useState<string | null>(null);
  const [system, setSystem] = useState("You are a helpful assistant.");
  const [params, setParams] = useState<SamplingParams>({ temperature: 0.7, top_p: 0.95, max_tokens: 128 });
  const [messages, setMessages] = useState<ChatMessage[]>([]);
  const [draft, setDraft] = useState("");
  const [streaming, setStreaming] = useState<string | null>(null);
  const [stats, setStats] = useState<StreamResult | null>(null);
  const [error, setError] = useState<string | null>(null);
  const abort = useRef<AbortController | null>(null);
  const viewport = useRef<HTMLDivElement>(null);

  const ids = (models.data?.data ?? []).map((m) => m.id);
  useEffect(() => {
    if (ids.length && (!model || !ids.includes(model))) setModel(ids[0]);
  }, [ids.join("|")]); // eslint-disable-line react-hooks/exhaustive-deps
  useEffect(() => {
    viewport.current?.scrollTo({ top: viewport.current.scrollHeight });
  }, [messages, streaming]);
  useEffect(() => () => abort.current?.abort(), []);

  const send = async () => {
    const text = draft.trim();
    if (!text || !model || streaming !== null) return;
    const history: ChatMessage[] = [...messages, { role: "user", content: text }];
    setMessages(history);
    setDraft("");
    setError(null);
    setStats(null);
    setStreaming("");
    const controller = new AbortController();
    abort.current = controller;
    let reply = "";
    try {
      const prompt = system.trim() ? [{ role: "system" as const, content: system.trim() }, ...history] : history;
      const result = await streamChat(model, prompt, params, (delta) => {
        reply += delta;
        setStreaming(reply);
      }, controller.signal);
      setStats(result);
    } catch (e) {
      if ((e as Error).name !== "AbortError") setError((e as Error).message);
    } finally {
      setMessages((list) => [...list, { role: "assistant", content: reply }]);
      setStreaming(null);
      abort.current = null;
    }
  };

  return (
    <Stack>
      <Title order={2}>Playground</Title>
      <Grid>
        <Grid.Col span={{ base: 12, md: 8 }}>
          <Paper withBorder radius="md" p="md">
            <ScrollArea h={380} viewportRef={viewport} data-testid="chat-log">
              <Stack gap="sm">
                {messages.length === 0 && streaming === null && (
                  <Text c="dimmed" size="sm">Send a message: the reply streams in token by token.</Text>
                )}
                {messages.map((m, i) => (
                  <Bubble key={i} message={m} />
                ))}
                {streaming !== null && <Bubble message={{ role: "assistant", content: streaming }} streaming />}
              </Stack>
            </ScrollArea>
            {error && <Alert color="red" mt="sm" data-testid="chat-error">{error}</Alert>}
            <form onSubmit={(e) => { e.preventDefault(); void send(); }}>
              <Group mt="md" align="flex-end">
                <Textarea
                  style={{ flex: 1 }}
                  autosize
                  minRows={1}
                  maxRows={5}
                  placeholder="Ask something…"
                  value={draft}
                  onChange={(e) => setDraft(e.currentTarget.value)}
                  onKeyDown={(e) => {
                    if (e.key === "Enter" && !e.shiftKey) {
                      e.preventDefault();
                      void send();
                    }
                  }}
                  data-testid="chat-input"
                />
                {streaming !== null ? (
                  <Button color="red" variant="light" onClick={() => abort.current?.abort()} data-testid="chat-stop">Stop</Button>
                ) : (
                  <Button type="submit" disabled={!draft.trim() || !model} data-testid="chat-send">Send</Button>
                )}
                <Button variant="subtle" onClick={() => { setMessages([]); setStats(null); }} disabled={streaming !== null}>
                  Clear
                </Button>
              </Group>
            </form>
            {stats && (
              <Text size="xs" c="dimmed" mt="xs" data-testid="chat-stats">
                TTFT {formatNumber(stats.ttftMs, 0)} ms · {formatNumber(stats.tokensPerSecond, 1)} tok/s
                {stats.completionTokens != null ? ` · ${stats.completionTokens} tokens` : ""}
                {stats.finishReason ? ` · finish: ${stats.finishReason}` : ""}
              </Text>
            )}
          </Paper>
        </Grid.Col>
        <Grid.Col span={{ base: 12, md: 4 }}>
          <Paper withBorder radius="md" p="md">
            <Stack>
              <Select label="Model" data={ids} value={model} onChange={setModel} placeholder={models.loading ? "Loading…" : "No model loaded"}
                data-testid="chat-model" allowDeselect={false} />
              <Textarea label="System prompt" autosize minRows={2} maxRows={6} value={system}
                onChange={(e) => setSystem(e.currentTarget.value)} />
              <div>
                <Text size="sm" fw={500}>Temperature: {params.temperature.toFixed(2)}</Text>
                <Slider min={0} max={2} step={0.05} value={params.temperature} label={null}
                  onChange={(v) => setParams((p) => ({ ...p, temperature: v }))} data-testid="temperature" />
              </div>
              <div>
                <Text size="sm" fw={500}>Top p: {params.top_p.toFixed(2)}</Text>
                <Slider min={0.05} max={1} step={0.05} value={params.top_p} label={null}
                  onChange={(v) => setParams((p) => ({ ...p, top_p: v }))} data-testid="top-p" />
              </div>
              <NumberInput label="Max tokens" min={1} max={32768} value={params.max_tokens}
                onChange={(v) => setParams((p) => ({ ...p, max_tokens: typeof v === "number" ? v : p.max_tokens }))}
                data-testid="max-tokens" />
            </Stack>
          </Paper>
        </Grid.Col>
      </Grid>
    </Stack>
  );
}
