// Chat with a model, tokens streamed through /v1/chat/completions (SSE over fetch): the model's thinking
// apart from its answer, a thinking switch (chat_template_kwargs.enable_thinking), a preset's defaults,
// and the chosen model's effective context length; a vision model (`capabilities` has "vision") takes an image.
import {
  Alert,
  Button,
  CloseButton,
  FileButton,
  Grid,
  Group,
  Image,
  NumberInput,
  Paper,
  ScrollArea,
  SegmentedControl,
  Select,
  Stack,
  Text,
  Textarea,
  Title,
} from "@mantine/core";
import { useEffect, useRef, useState } from "react";
import { endpoints } from "../api/endpoints";
import { Reasoning } from "../components/Reasoning";
import { streamChat, type ChatMessage, type SamplingParams, type StreamResult } from "../lib/chat";
import { formatNumber } from "../lib/format";
import { PRESETS_PATH, type Preset, type PresetList } from "../lib/presets";
import type { ModelList } from "../lib/types";
import { useApi } from "../lib/useApi";

const DEFAULT_SYSTEM = "You are a helpful assistant.";
const DEFAULT_PARAMS: SamplingParams = { temperature: 0.7, top_p: 0.95, max_tokens: 128 };
type Thinking = "default" | "on" | "off";

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
        {message.image ? <Image src={message.image} alt="attached image" mah={160} w="auto" fit="contain" radius="sm" mb="xs" data-testid="message-image" /> : null}
        {message.reasoning ? <Reasoning text={message.reasoning} streaming={streaming && !message.content} /> : null}
        <Text size="sm" style={{ whiteSpace: "pre-wrap" }} data-testid="message-content">
          {message.content || (streaming ? "…" : "")}
        </Text>
      </Paper>
    </Group>
  );
}

/** A picked file as a data: URL, the form an `image_url` part carries it in. */
function readDataUrl(file: File): Promise<string> {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => (typeof reader.result === "string" ? resolve(reader.result) : reject(new Error("could not read the file")));
    reader.onerror = () => reject(reader.error ?? new Error("could not read the file"));
    reader.readAsDataURL(file);
  });
}

/** A sampling field left blank shows what applies instead: the preset's value, or the server's default. */
function placeholder(preset: Preset | null, value: number | null | undefined): string {
  return value != null ? `preset: ${value}` : preset ? "model default" : "server default";
}

export function Playground() {
  const models = useApi<ModelList>(endpoints.openaiModels, 15000);
  const presetsApi = useApi<PresetList>(PRESETS_PATH, 30000);
  const [model, setModel] = useState<string | null>(null);
  const [system, setSystem] = useState(DEFAULT_SYSTEM);
  const [params, setParams] = useState<SamplingParams>(DEFAULT_PARAMS);
  const [thinking, setThinking] = useState<Thinking>("default");
  const [messages, setMessages] = useState<ChatMessage[]>([]);
  const [draft, setDraft] = useState("");
  const [image, setImage] = useState<{ name: string; url: string } | null>(null);
  const [streaming, setStreaming] = useState<ChatMessage | null>(null);
  const [stats, setStats] = useState<StreamResult | null>(null);
  const [error, setError] = useState<string | null>(null);
  const abort = useRef<AbortController | null>(null);
  const viewport = useRef<HTMLDivElement>(null);

  const cards = models.data?.data ?? [];
  const presets = presetsApi.data?.presets ?? [];
  // A preset is a model id too (/v1/models lists it): choosing either select's entry picks the same thing.
  const preset = presets.find((p) => p.name === model) ?? null;
  const ids = [...new Set([...cards.map((m) => m.id), ...presets.map((p) => p.name)])];
  useEffect(() => {
    // First a plain model: a preset's card (`preset: true`, not in the generated types yet) would bring its defaults.
    const loaded = cards.filter((m) => !(m as { preset?: boolean }).preset).map((m) => m.id);
    if (loaded.length && (!model || !ids.includes(model))) setModel(loaded[0]);
  }, [ids.join("|")]); // eslint-disable-line react-hooks/exhaustive-deps
  useEffect(() => {
    viewport.current?.scrollTo({ top: viewport.current.scrollHeight });
  }, [messages, streaming]);
  useEffect(() => () => abort.current?.abort(), []);

  // The effective context: the model's (or the preset's own resident's) card, else what the preset sets,
  // else its base model's card.
  const contextOf = (id: string | null) => cards.find((c) => c.id === id)?.context_length ?? null;
  const context = contextOf(model) ?? (preset ? (preset.context_length || contextOf(preset.model)) ?? null : null);
  // Images only for a vision model (the card's capabilities; a preset's own card, else its base model's).
  const capabilities = (cards.find((c) => c.id === model) ?? cards.find((c) => c.id === preset?.model))?.capabilities;
  const vision = capabilities?.includes("vision") ?? false;
  useEffect(() => {
    if (!vision) setImage(null);
  }, [vision]);
  const attach = (file: File | null) => {
    if (!file) return;
    readDataUrl(file).then((url) => setImage({ name: file.name, url }), (e: Error) => setError(e.message));
  };

  const choose = (id: string | null) => {
    const next = presets.find((p) => p.name === id) ?? null;
    if (next) {
      // The preset's defaults apply unless the user types a value: clear ours, show its as placeholders.
      setParams({});
      setSystem("");
    } else if (preset) {
      setParams(DEFAULT_PARAMS);
      setSystem(DEFAULT_SYSTEM);
    }
    setModel(id);
  };

  const send = async () => {
    const text = draft.trim();
    if (!text || !model || streaming !== null) return;
    const sent: ChatMessage = image ? { role: "user", content: text, image: image.url } : { role: "user", content: text };
    const history: ChatMessage[] = [...messages, sent];
    setMessages(history);
    setDraft("");
    setImage(null);
    setError(null);
    setStats(null);
    setStreaming({ role: "assistant", content: "" });
    const controller = new AbortController();
    abort.current = controller;
    const reply: ChatMessage = { role: "assistant", content: "", reasoning: "" };
    try {
      const prompt = system.trim() ? [{ role: "system" as const, content: system.trim() }, ...history] : history;
      const options = { params, thinking: thinking === "default" ? null : thinking === "on" };
      const result = await streamChat(model, prompt, options, (delta) => {
        reply.content += delta.content;
        reply.reasoning += delta.reasoning;
        setStreaming({ ...reply });
      }, controller.signal);
      setStats(result);
    } catch (e) {
      if ((e as Error).name !== "AbortError") setError((e as Error).message);
    } finally {
      setMessages((list) => [...list, reply]);
      setStreaming(null);
      abort.current = null;
    }
  };

  const number = (field: keyof SamplingParams) => (v: string | number) =>
    setParams((p) => ({ ...p, [field]: typeof v === "number" ? v : undefined }));
  const presetThinking = preset?.chat_template_kwargs?.enable_thinking;

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
                {streaming !== null && <Bubble message={streaming} streaming />}
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
                {vision && (
                  <FileButton onChange={attach} accept="image/png,image/jpeg,image/webp">
                    {(props) => <Button variant="light" {...props} disabled={streaming !== null} data-testid="chat-attach">Image</Button>}
                  </FileButton>
                )}
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
            {image && (
              <Group gap="xs" mt="xs" data-testid="chat-image">
                <Image src={image.url} alt={image.name} h={40} w={40} fit="cover" radius="sm" />
                <Text size="xs" c="dimmed">{image.name}</Text>
                <CloseButton size="sm" aria-label="Remove the image" onClick={() => setImage(null)} data-testid="chat-image-remove" />
              </Group>
            )}
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
              {presets.length > 0 && (
                <Select label="Preset" data={presets.map((p) => ({ value: p.name, label: `${p.name} (${p.model})` }))}
                  value={preset?.name ?? null} onChange={(v) => choose(v ?? preset?.model ?? null)} clearable
                  placeholder="None" data-testid="chat-preset" />
              )}
              <Select label="Model" data={ids} value={model} onChange={choose} placeholder={models.loading ? "Loading…" : "No model loaded"}
                data-testid="chat-model" allowDeselect={false} />
              <Text size="xs" c="dimmed" mt={-8} data-testid="chat-context" data-context={context ?? ""}>
                Context: {context ? `${context.toLocaleString("en-US")} tokens` : preset ? "set when the preset loads" : "–"}
              </Text>
              <Textarea label="System prompt" autosize minRows={2} maxRows={6} value={system}
                placeholder={preset?.system ? `preset: ${preset.system}` : "none"}
                onChange={(e) => setSystem(e.currentTarget.value)} data-testid="system-prompt" />
              <div>
                <Text size="sm" fw={500}>Thinking</Text>
                <SegmentedControl fullWidth size="xs" value={thinking} onChange={setThinking}
                  data={[{ value: "default", label: "Model default" }, { value: "on", label: "On" }, { value: "off", label: "Off" }]}
                  data-testid="thinking" />
                <Text size="xs" c="dimmed" mt={2}>
                  {thinking === "default"
                    ? typeof presetThinking === "boolean" ? `the preset's: ${presetThinking ? "on" : "off"}` : "the chat template's own default"
                    : `sends chat_template_kwargs.enable_thinking = ${thinking === "on"}`}
                </Text>
              </div>
              <Group grow>
                <NumberInput label="Temperature" min={0} max={2} step={0.05} decimalScale={2} value={params.temperature ?? ""}
                  placeholder={placeholder(preset, preset?.parameters?.temperature)} onChange={number("temperature")}
                  data-testid="temperature" />
                <NumberInput label="Top p" min={0.01} max={1} step={0.05} decimalScale={2} value={params.top_p ?? ""}
                  placeholder={placeholder(preset, preset?.parameters?.top_p)} onChange={number("top_p")} data-testid="top-p" />
              </Group>
              <NumberInput label="Max tokens" min={1} max={131072} allowDecimal={false} value={params.max_tokens ?? ""}
                placeholder={placeholder(preset, preset?.parameters?.max_tokens)} onChange={number("max_tokens")}
                data-testid="max-tokens" />
            </Stack>
          </Paper>
        </Grid.Col>
      </Grid>
    </Stack>
  );
}
