// Local and resident models: load, unload, delete; presets; pull from the hub with progress; discovery.
import {
  Alert,
  Badge,
  Button,
  Group,
  Paper,
  Progress,
  Stack,
  Table,
  Text,
  TextInput,
  Title,
  Tooltip,
} from "@mantine/core";
import { useEffect, useState } from "react";
import { endpoints } from "../api/endpoints";
import { PresetsPanel } from "../components/PresetsPanel";
import { ApiError, apiJson, postJson } from "../lib/api";
import { formatBytes } from "../lib/format";
import { useRealtimeEvent } from "../lib/realtime";
import type {
  DiscoverResponse, LoadRequest, ModelInfo, ModelsOverview, PullList, PullRequest, PullStatus, UnloadRequest,
} from "../lib/types";
import { useApi } from "../lib/useApi";

type Action = "load" | "unload" | "delete";

function ModelRow({ model, busy, canDelete, onAction }: {
  model: ModelInfo;
  busy: Action | null;
  canDelete: boolean;
  onAction: (action: Action, model: ModelInfo) => void;
}) {
  const resident = model.state === "resident";
  return (
    <Table.Tr data-testid={`model-row-${model.id}`} data-state={model.state}>
      <Table.Td>
        <Text fw={500}>{model.id}</Text>
        {model.error && (
          <Text size="xs" c="red">
            {model.error}
          </Text>
        )}
      </Table.Td>
      <Table.Td>
        <Group gap={4}>
          <Badge color={resident ? "teal" : "gray"} variant="light" data-testid="model-state">
            {model.state}
          </Badge>
          {model.pinned && <Badge variant="outline">default</Badge>}
          {model.vision && <Badge color="grape" variant="light" data-testid="vision">vision</Badge>}
          {model.busy && <Badge color="blue">generating</Badge>}
        </Group>
      </Table.Td>
      <Table.Td>{model.format ?? "–"}</Table.Td>
      <Table.Td>{formatBytes(model.size_bytes)}</Table.Td>
      <Table.Td>
        {resident ? formatBytes(model.memory_bytes) : "–"}
        {resident && model.compute_dtype && (
          <Tooltip label={model.compute_dtype_reason ?? ""} multiline w={320} disabled={!model.compute_dtype_reason}>
            <Text size="xs" c="dimmed" data-testid="compute-dtype">{model.compute_dtype}</Text>
          </Tooltip>
        )}
      </Table.Td>
      <Table.Td>{model.context_length ?? "–"}</Table.Td>
      <Table.Td>
        <Group gap="xs" justify="flex-end" wrap="nowrap">
          {resident ? (
            <Button size="xs" variant="light" color="orange" loading={busy === "unload"} disabled={model.busy}
              onClick={() => onAction("unload", model)} data-testid="unload">
              Unload
            </Button>
          ) : (
            <Button size="xs" variant="light" loading={busy === "load"} disabled={!!model.error}
              onClick={() => onAction("load", model)} data-testid="load">
              Load
            </Button>
          )}
          {canDelete && !resident && model.path && (
            <Button size="xs" variant="subtle" color="red" loading={busy === "delete"}
              onClick={() => onAction("delete", model)} data-testid="delete">
              Delete
            </Button>
          )}
        </Group>
      </Table.Td>
    </Table.Tr>
  );
}

function PullPanel({ list, onStart, onCancel }: {
  list: PullStatus[];
  onStart: (model: string) => Promise<boolean>;
  onCancel: (id: string) => void;
}) {
  const [repo, setRepo] = useState("");
  const start = async (model: string) => {
    if (await onStart(model)) setRepo("");
  };

  return (
    <Paper withBorder p="md" radius="md" data-testid="pull-panel">
      <Title order={4} mb="sm">
        Pull from the Hugging Face hub
      </Title>
      <form onSubmit={(e) => { e.preventDefault(); void start(repo.trim()); }}>
        <Group align="flex-end">
          <TextInput style={{ flex: 1 }} label="Repository" placeholder="mlx-community/Qwen2.5-0.5B-Instruct-4bit"
            value={repo} onChange={(e) => setRepo(e.currentTarget.value)} data-testid="pull-input" />
          <Button type="submit" disabled={!repo.trim()} data-testid="pull-start">Pull</Button>
        </Group>
      </form>
      <Stack mt="md" gap="sm">
        {list.slice().reverse().slice(0, 8).map((p) => {
          const percent = p.bytes_total ? (100 * p.bytes_done) / p.bytes_total : 0;
          const live = p.status === "queued" || p.status === "downloading";
          return (
            <div key={p.id} data-testid={`pull-${p.id}`}>
              <Group justify="space-between" mb={4}>
                <Text size="sm" fw={500}>{p.model}</Text>
                <Group gap="xs">
                  <Text size="xs" c="dimmed">
                    {formatBytes(p.bytes_done)}{p.bytes_total ? ` / ${formatBytes(p.bytes_total)}` : ""}
                  </Text>
                  <Badge size="sm" color={p.status === "done" ? "teal" : p.status === "failed" ? "red" : "blue"}>
                    {p.status}
                  </Badge>
                  {live && (
                    <Button size="compact-xs" variant="subtle" color="red"
                      onClick={() => onCancel(p.id)}>
                      Cancel
                    </Button>
                  )}
                </Group>
              </Group>
              <Progress value={p.status === "done" ? 100 : percent} animated={live} striped={live} />
              {p.error && <Text size="xs" c="red">{p.error}</Text>}
            </div>
          );
        })}
      </Stack>
    </Paper>
  );
}

function DiscoverPanel({ onPull }: { onPull: (id: string, file: string | null) => void }) {
  const [query, setQuery] = useState("");
  const [submitted, setSubmitted] = useState("");
  const discover = useApi<DiscoverResponse>(endpoints.discover(submitted));
  if (discover.missing) return null;
  const body = discover.data;
  return (
    <Paper withBorder p="md" radius="md" data-testid="discover-panel">
      <Group justify="space-between" mb="sm">
        <Title order={4}>Recommended models</Title>
        {body && <Text size="xs" c="dimmed">fits: within this server's budget of {formatBytes(body.memory_budget_bytes)}</Text>}
      </Group>
      <form onSubmit={(e) => { e.preventDefault(); setSubmitted(query.trim()); }}>
        <Group align="flex-end" mb="sm">
          <TextInput style={{ flex: 1 }} placeholder="Search (the hub when reachable, else the curated catalogue)"
            value={query} onChange={(e) => setQuery(e.currentTarget.value)} />
          <Button type="submit" variant="light">Search</Button>
        </Group>
      </form>
      {body?.hub_error && <Text size="xs" c="dimmed" mb="xs">Hub not reachable: showing the catalogue.</Text>}
      {discover.error && !discover.missing && <Text c="red" size="sm">{discover.error.message}</Text>}
      <Table.ScrollContainer minWidth={600}>
        <Table striped>
          <Table.Thead>
            <Table.Tr>
              <Table.Th>Model</Table.Th><Table.Th>Quant.</Table.Th><Table.Th>Size</Table.Th>
              <Table.Th>Memory</Table.Th><Table.Th>Fits</Table.Th><Table.Th />
            </Table.Tr>
          </Table.Thead>
          <Table.Tbody>
            {(body?.data ?? []).map((m) => (
              <Table.Tr key={`${m.id}/${m.file ?? ""}`} data-testid={`discover-row-${m.id}`}>
                <Table.Td>
                  <Group gap={6}>
                    <Text size="sm" fw={500}>{m.id}</Text>
                    {m.format === "gguf" && <Badge size="xs" variant="outline">GGUF · llama.cpp</Badge>}
                    {m.faster && <Badge size="xs" color="teal" data-testid="faster">faster here</Badge>}
                    {m.vision && <Badge size="xs" color="grape" variant="light" data-testid="discover-vision">vision</Badge>}
                  </Group>
                  {m.file && <Text size="xs" ff="monospace">{m.file}</Text>}
                  {m.description && <Text size="xs" c="dimmed">{m.description}</Text>}
                </Table.Td>
                <Table.Td>{m.quantization ?? "–"}</Table.Td>
                <Table.Td>{formatBytes(m.size_bytes)}</Table.Td>
                <Table.Td>
                  <Tooltip label={m.memory_note ?? "approximate"} multiline w={320} disabled={!m.memory_note}>
                    <div>
                      <Text size="sm">{formatBytes(m.memory_bytes)}</Text>
                      {m.compute_dtype && <Text size="xs" c="dimmed">{m.compute_dtype}</Text>}
                    </div>
                  </Tooltip>
                </Table.Td>
                <Table.Td>
                  <Badge color={m.fits === null ? "gray" : m.fits ? "teal" : "red"} variant="light">
                    {m.fits === null ? "unknown" : m.fits ? "fits" : "too big"}
                  </Badge>
                </Table.Td>
                <Table.Td>
                  {m.local ? <Badge variant="outline">local</Badge> : (
                    <Button size="compact-xs" variant="light" onClick={() => onPull(m.id, m.file)}>Pull</Button>
                  )}
                </Table.Td>
              </Table.Tr>
            ))}
          </Table.Tbody>
        </Table>
      </Table.ScrollContainer>
    </Paper>
  );
}

export function Models() {
  const models = useApi<ModelsOverview>(endpoints.models, 10000);
  const [busy, setBusy] = useState<Record<string, Action>>({});
  const [error, setError] = useState<string | null>(null);
  const [pulling, setPulling] = useState(false);
  const pullsApi = useApi<PullList>(endpoints.pulls, pulling ? 1000 : 10000);
  const pullList = pullsApi.data?.data ?? [];
  const canDelete = !pullsApi.missing && pullsApi.data !== null; // DELETE /api/models/<id> came with pulls
  useRealtimeEvent("model_event", () => models.reload());
  useRealtimeEvent("pull_progress", () => pullsApi.reload());

  const running = pullList.some((p) => p.status === "queued" || p.status === "downloading");
  useEffect(() => {
    setPulling(running);
    if (!running) models.reload(); // a pull finished: its model is local now
  }, [running]); // eslint-disable-line react-hooks/exhaustive-deps

  const act = async (action: Action, model: ModelInfo) => {
    setBusy((b) => ({ ...b, [model.id]: action }));
    setError(null);
    try {
      if (action === "delete") {
        if (!window.confirm(`Delete ${model.id} from disk?`)) return;
        await apiJson(endpoints.model(model.id), { method: "DELETE" });
      } else {
        await postJson(endpoints.modelAction[action], { model: model.id } satisfies LoadRequest & UnloadRequest);
      }
    } catch (e) {
      setError(e instanceof ApiError ? `${action} ${model.id}: ${e.message}` : String(e));
    } finally {
      setBusy(({ [model.id]: _, ...rest }) => rest);
      models.reload();
    }
  };

  const pull = async (id: string, file: string | null = null): Promise<boolean> => {
    setError(null);
    try {
      await postJson(endpoints.pull, (file ? { model: id, gguf: file } : { model: id }) satisfies PullRequest);
      setPulling(true);
      pullsApi.reload();
      return true;
    } catch (e) {
      setError(`pull ${id}: ${(e as Error).message}`);
      return false;
    }
  };

  const cancelPull = (id: string) => {
    apiJson(endpoints.pullById(id), { method: "DELETE" })
      .catch((e: Error) => setError(e.message))
      .finally(pullsApi.reload);
  };

  const overview = models.data;
  const used = overview ? (100 * overview.memory_used_bytes) / Math.max(1, overview.memory_budget_bytes) : 0;
  return (
    <Stack>
      <Title order={2}>Models</Title>
      {models.error && !overview && <Alert color="red" title="Cannot list models">{models.error.message}</Alert>}
      {error && <Alert color="red" withCloseButton onClose={() => setError(null)} data-testid="models-error">{error}</Alert>}
      {overview && (
        <Paper withBorder p="md" radius="md">
          <Group justify="space-between" mb={6}>
            <Text fw={600}>Memory budget</Text>
            <Text size="sm" c="dimmed" data-testid="memory-budget">
              {formatBytes(overview.memory_used_bytes)} of {formatBytes(overview.memory_budget_bytes)} used by resident models
            </Text>
          </Group>
          <Progress value={used} color={used > 90 ? "red" : "blue"} size="lg" />
        </Paper>
      )}
      <Paper withBorder radius="md">
        <Table.ScrollContainer minWidth={700}>
          <Table striped highlightOnHover verticalSpacing="sm" data-testid="models-table">
            <Table.Thead>
              <Table.Tr>
                <Table.Th>Model</Table.Th><Table.Th>State</Table.Th><Table.Th>Format</Table.Th>
                <Table.Th>On disk</Table.Th><Table.Th>In memory</Table.Th><Table.Th>Context</Table.Th><Table.Th />
              </Table.Tr>
            </Table.Thead>
            <Table.Tbody>
              {(overview?.data ?? []).map((m) => (
                <ModelRow key={m.id} model={m} busy={busy[m.id] ?? null} canDelete={canDelete} onAction={(action, model) => void act(action, model)} />
              ))}
            </Table.Tbody>
          </Table>
        </Table.ScrollContainer>
      </Paper>
      <PresetsPanel models={(overview?.data ?? []).filter((m) => m.kind === "language").map((m) => m.id)}
        onChange={models.reload} />
      {pullsApi.missing ? (
        <Tooltip label={`This server has no ${endpoints.pull} endpoint.`}>
          <Text size="sm" c="dimmed" data-testid="pull-unavailable">Pulling models: not available on this server.</Text>
        </Tooltip>
      ) : (
        <PullPanel list={pullList} onStart={pull} onCancel={cancelPull} />
      )}
      <DiscoverPanel onPull={(id, file) => void pull(id, file)} />
    </Stack>
  );
}
