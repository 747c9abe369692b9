// What this server is: version, health, configuration (read-only, secrets masked), API docs.
import { Alert, Anchor, Badge, Code, Group, Paper, SimpleGrid, Stack, Table, Text, Title } from "@mantine/core";
import { useEffect, useState } from "react";
import { endpoints } from "../api/endpoints";
import { endpointExists } from "../lib/api";
import { formatBytes, formatDuration } from "../lib/format";
import type { ConfigList, HardwareReport, Health } from "../lib/types";
import { useApi } from "../lib/useApi";

function show(value: unknown): string {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "bigint") return value.toString();
  return JSON.stringify(value) ?? "–"; // objects and arrays; JSON never holds the rest
}

function Facts({ rows }: { rows: [string, unknown][] }) {
  return (
    <Table withRowBorders={false} verticalSpacing={4}>
      <Table.Tbody>
        {rows.map(([k, v]) => (
          <Table.Tr key={k}>
            <Table.Td c="dimmed" w="45%">{k}</Table.Td>
            <Table.Td data-testid={`fact-${k}`}>{show(v)}</Table.Td>
          </Table.Tr>
        ))}
      </Table.Tbody>
    </Table>
  );
}

export function Server() {
  const health = useApi<Health>(endpoints.health, 5000);
  const config = useApi<ConfigList>(endpoints.config);
  const hardware = useApi<HardwareReport>(endpoints.hardware);
  const [docs, setDocs] = useState<boolean | null>(null);
  useEffect(() => {
    void endpointExists(endpoints.openapi).then(setDocs);
  }, []);

  const h = health.data;
  return (
    <Stack>
      <Group justify="space-between">
        <Title order={2}>Server</Title>
        {docs === null ? null : docs ? (
          <Anchor href={endpoints.docs} target="_blank" data-testid="docs-link">API docs (/docs) ↗</Anchor>
        ) : (
          <Text size="sm" c="dimmed" data-testid="docs-unavailable">API docs: not available on this server</Text>
        )}
      </Group>
      {health.error && !h && <Alert color="red" title={`${endpoints.health} did not answer`}>{health.error.message}</Alert>}
      {h && (
        <SimpleGrid cols={{ base: 1, md: 2 }}>
          <Paper withBorder p="md" radius="md">
            <Group mb="xs">
              <Text fw={600}>Impetus</Text>
              <Badge color={h.status === "ok" ? "teal" : "orange"} data-testid="health-status">{h.status}</Badge>
            </Group>
            <Facts rows={[
              ["version", h.version],
              ["uptime", formatDuration(h.uptime_s)],
              ["ready", h.ready === undefined ? undefined : `${h.ready ? "yes" : "no"}${h.reason && !h.ready ? ` (${h.reason})` : ""}`],
              ["process id", h.pid],
              ["engine thread alive", h.engine_alive],
              ["requests in flight", h.requests_in_flight],
            ]} />
          </Paper>
          <Paper withBorder p="md" radius="md">
            <Text fw={600} mb="xs">Compute</Text>
            <Facts rows={[
              ["compute dtype", h.compute_dtype],
              ["BLAS", h.blas],
              ["C allocator", h.allocator],
              ["prompt cache", h.prompt_cache_enabled === undefined ? undefined
                : h.prompt_cache_enabled ? `${formatBytes(h.prompt_cache_bytes)} of ${formatBytes(h.prompt_cache_limit_bytes)}` : "off"],
              ["prompt cache tiers", h.prompt_cache_tiers === undefined ? undefined
                : `live KV ${formatBytes(h.prompt_cache_tiers.live.bytes)}; RAM ${h.prompt_cache_tiers.ram.hits} hits, `
                  + `${h.prompt_cache_tiers.ram.misses} misses; disk ${h.prompt_cache_tiers.disk.limit_bytes
                    ? `${formatBytes(h.prompt_cache_tiers.disk.bytes)} of ${formatBytes(h.prompt_cache_tiers.disk.limit_bytes)}, `
                      + `${h.prompt_cache_tiers.disk.hits} hits, ${h.prompt_cache_tiers.disk.misses} misses` : "off"}`],
              ["batch size", h.max_batch === undefined ? undefined
                : `${h.max_batch}${h.batch_limit != null ? ` (capped at ${h.batch_limit}: thermal)` : ""}`],
              ["resident models", h.models.map((m) => `${m.id} (${formatBytes(m.bytes)})`).join(", ")],
            ]} />
          </Paper>
          {hardware.data && (
            <Paper withBorder p="md" radius="md" data-testid="hardware">
              <Text fw={600} mb="xs">Machine</Text>
              <Facts rows={[
                ["platform", `${hardware.data.platform.system} ${hardware.data.platform.release} (${hardware.data.platform.machine})`],
                ["CPU", hardware.data.cpu
                  ? `${hardware.data.cpu.brand ?? "unknown"}, ${hardware.data.cpu.cores_physical ?? "?"} cores / ${hardware.data.cpu.cores_logical ?? "?"} threads`
                  : hardware.data.unavailable?.cpu],
                ["memory", hardware.data.memory
                  ? `${formatBytes(hardware.data.memory.total_bytes)}${hardware.data.memory.unified ? " unified" : ""}` : hardware.data.unavailable?.memory],
                ["GPU", hardware.data.gpus?.length ? hardware.data.gpus.map((g) => g.name).join(", ") : "none"],
                ["MLX", hardware.data.mlx ? `${hardware.data.mlx.version} on ${hardware.data.mlx.device}` : hardware.data.unavailable?.mlx],
                ["thermal", hardware.data.thermal ? `${hardware.data.thermal.state} (${hardware.data.thermal.source})`
                  : hardware.data.unavailable?.thermal ?? "unknown"],
              ]} />
            </Paper>
          )}
        </SimpleGrid>
      )}
      <Paper withBorder p="md" radius="md">
        <Text fw={600} mb="xs">Configuration</Text>
        {config.missing && <Text size="sm" c="dimmed">Not available on this server.</Text>}
        {config.error && !config.missing && <Text size="sm" c="red">{config.error.message}</Text>}
        {config.data && (
          <Table.ScrollContainer minWidth={600}>
            <Table striped verticalSpacing={4} data-testid="config-table">
              <Table.Thead>
                <Table.Tr><Table.Th>Variable</Table.Th><Table.Th>Value</Table.Th><Table.Th>Meaning</Table.Th></Table.Tr>
              </Table.Thead>
              <Table.Tbody>
                {config.data.data.map((c) => (
                  <Table.Tr key={c.name}>
                    <Table.Td><Code>{c.env}</Code></Table.Td>
                    <Table.Td>{c.secret ? <Badge variant="outline" color="gray">{show(c.value)}</Badge> : show(c.value)}</Table.Td>
                    <Table.Td><Text size="xs" c="dimmed">{c.description}</Text></Table.Td>
                  </Table.Tr>
                ))}
              </Table.Tbody>
            </Table>
          </Table.ScrollContainer>
        )}
      </Paper>
    </Stack>
  );
}
