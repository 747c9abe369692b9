// Live view of the server: throughput, latency and load as time series, machine gauges, thermal state.
import { GaugeChart, LineChart } from "@mantine/charts";
import { Alert, Badge, Group, Paper, SimpleGrid, Stack, Text, Title } from "@mantine/core";
import { useEffect, useState } from "react";
import { endpoints } from "../api/endpoints";
import { formatBytes, formatClock, formatNumber } from "../lib/format";
import { useRealtime } from "../lib/realtime";
import type { HardwareReport } from "../lib/types";
import type { Sample } from "../lib/metrics";
import { useApi } from "../lib/useApi";

const THERMAL_COLOR: Record<string, string> = { nominal: "teal", fair: "yellow", serious: "orange", critical: "red" };

interface SeriesSpec {
  key: keyof Sample;
  title: string;
  unit: string;
  color: string;
  digits: number;
}

const SERIES: SeriesSpec[] = [
  { key: "tokensPerSecond", title: "Throughput", unit: "tok/s", color: "blue.6", digits: 1 },
  { key: "ttftMs", title: "Time to first token", unit: "ms", color: "violet.6", digits: 0 },
  { key: "queueDepth", title: "Queue depth", unit: "waiting", color: "orange.6", digits: 0 },
  { key: "activeRequests", title: "Active requests", unit: "in flight", color: "teal.6", digits: 0 },
];

function latest(samples: Sample[], key: keyof Sample): number | null {
  for (let i = samples.length - 1; i >= 0; i--) {
    const v = samples[i][key];
    if (typeof v === "number") return v;
  }
  return null;
}

/** A round upper bound (1, 2, 4 or 8 times a power of ten) so that five ticks fall evenly. */
export function niceMax(max: number): number {
  if (!(max > 0)) return 4;
  const decade = 10 ** Math.floor(Math.log10(max));
  return ([1, 2, 4, 8, 10].map((f) => f * decade).find((v) => v >= max) ?? 10 * decade);
}

function SeriesChart({ spec, samples }: { spec: SeriesSpec; samples: Sample[] }) {
  const data = samples.map((s) => ({ time: formatClock(s.t), value: s[spec.key] as number | null }));
  return (
    <Paper withBorder p="md" radius="md" data-testid={`chart-${spec.key}`}>
      <Group justify="space-between" mb="xs">
        <Text fw={600}>{spec.title}</Text>
        <Text size="xl" fw={700} data-testid={`value-${spec.key}`}>
          {formatNumber(latest(samples, spec.key), spec.digits)}{" "}
          <Text span size="sm" c="dimmed">
            {spec.unit}
          </Text>
        </Text>
      </Group>
      <LineChart
        h={150}
        data={data}
        dataKey="time"
        series={[{ name: "value", label: spec.title, color: spec.color }]}
        curveType="monotone"
        withDots={spec.key === "ttftMs"} // one point per finished request: sparse
        connectNulls
        tickLine="none"
        gridAxis="x"
        valueFormatter={(v) => v.toFixed(spec.digits)}
        lineProps={{ isAnimationActive: false }}
        xAxisProps={{ minTickGap: 40 }}
        yAxisProps={{ width: 44, allowDecimals: spec.digits > 0, domain: [0, niceMax], tickCount: 5 }}
      />
    </Paper>
  );
}

function Gauge({ label, value, detail }: { label: string; value: number | null; detail?: string }) {
  const v = value ?? 0;
  return (
    <Paper withBorder p="md" radius="md" data-testid={`gauge-${label.toLowerCase()}`}>
      <Stack align="center" gap={4}>
        <Text fw={600}>{label}</Text>
        <GaugeChart
          value={v}
          size={150}
          thickness={14}
          roundCaps
          filledColor={v > 90 ? "red.6" : v > 75 ? "orange.6" : "blue.6"}
          valueFormatter={() => (value === null ? "–" : `${v.toFixed(0)}%`)}
        />
        <Text size="sm" c="dimmed">
          {detail ?? " "}
        </Text>
      </Stack>
    </Paper>
  );
}

export function Overview() {
  const { samples, state, hardware: liveHardware } = useRealtime();
  const hardwareApi = useApi<HardwareReport>(endpoints.hardware, 15000);
  const hardware = liveHardware ?? hardwareApi.data;
  const [waited, setWaited] = useState(false);
  useEffect(() => {
    const id = window.setTimeout(() => setWaited(true), 4000);
    return () => window.clearTimeout(id);
  }, []);

  const last = samples.at(-1);
  const thermal = last?.thermalState ?? hardware?.thermal?.state ?? null;
  const gpu = hardware?.gpus?.find((g) => g.utilization_percent != null);
  const memoryDetail = hardware?.memory
    ? `${formatBytes(hardware.memory.total_bytes - hardware.memory.available_bytes)} of ${formatBytes(hardware.memory.total_bytes)}`
    : last?.processRssBytes != null
      ? `server RSS ${formatBytes(last.processRssBytes)}`
      : undefined;

  return (
    <Stack>
      <Group justify="space-between">
        <Title order={2}>Overview</Title>
        <Group gap="xs">
          <Text size="sm" c="dimmed">
            Thermal state
          </Text>
          <Badge color={thermal ? (THERMAL_COLOR[thermal] ?? "gray") : "gray"} data-testid="thermal-state">
            {thermal ?? "unknown"}
          </Badge>
        </Group>
      </Group>
      {samples.length === 0 && waited && (
        <Alert color="gray" title="No live metrics yet" data-testid="metrics-unavailable">
          {state === "connected"
            ? "The live feed is connected but this server sends no `metrics` events (not available on this version)."
            : "Waiting for the live feed (Socket.IO) to connect."}
        </Alert>
      )}
      <SimpleGrid cols={{ base: 1, md: 2 }}>
        {SERIES.map((spec) => (
          <SeriesChart key={spec.key} spec={spec} samples={samples} />
        ))}
      </SimpleGrid>
      <SimpleGrid cols={{ base: 1, sm: 2, md: gpu ? 3 : 2 }}>
        <Gauge label="Memory" value={last?.memoryPercent ?? null} detail={memoryDetail} />
        <Gauge
          label="CPU"
          value={last?.cpuPercent ?? null}
          detail={hardware?.cpu?.brand ? `${hardware.cpu.brand}` : undefined}
        />
        {gpu && <Gauge label="GPU" value={gpu.utilization_percent ?? null} detail={gpu.name} />}
      </SimpleGrid>
      {last?.latencyMs != null && (
        <Text size="xs" c="dimmed" data-testid="feed-latency">
          Last sample {formatClock(last.t)}, {formatNumber(last.latencyMs, 0)} ms from server to browser
          {hardware?.mlx ? ` · MLX on ${hardware.mlx.device}` : ""}
        </Text>
      )}
    </Stack>
  );
}
