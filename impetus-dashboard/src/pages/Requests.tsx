// The recent requests, as the server announces them (`request_event`): TTFT, tok/s, status.
import { Alert, Badge, Paper, Stack, Table, Text, Title } from "@mantine/core";
import { formatClock, formatNumber } from "../lib/format";
import { useRealtime } from "../lib/realtime";

const STATUS_COLOR: Record<string, string> = {
  running: "blue",
  finished: "teal",
  stop: "teal",
  length: "teal",
  error: "red",
  failed: "red",
  cancelled: "gray",
};

export function Requests() {
  const { requests, state } = useRealtime();
  return (
    <Stack>
      <Title order={2}>Requests</Title>
      <Text size="sm" c="dimmed">
        Requests seen since this page opened (the latest {requests.length ? requests.length : "none"}), live from the server.
      </Text>
      {requests.length === 0 && (
        <Alert color="gray" data-testid="requests-empty">
          {state === "connected"
            ? "No requests yet. Send one from the Playground or any OpenAI client."
            : "Waiting for the live feed (Socket.IO) to connect."}
        </Alert>
      )}
      {requests.length > 0 && (
        <Paper withBorder radius="md">
          <Table.ScrollContainer minWidth={700}>
            <Table striped verticalSpacing="xs" data-testid="requests-table">
              <Table.Thead>
                <Table.Tr>
                  <Table.Th>Started</Table.Th>
                  <Table.Th>Request</Table.Th>
                  <Table.Th>Model</Table.Th>
                  <Table.Th>Status</Table.Th>
                  <Table.Th ta="right">TTFT ms</Table.Th>
                  <Table.Th ta="right">tok/s</Table.Th>
                  <Table.Th ta="right">In / out</Table.Th>
                  <Table.Th ta="right">Seconds</Table.Th>
                </Table.Tr>
              </Table.Thead>
              <Table.Tbody>
                {requests.map((r) => (
                  <Table.Tr key={r.id} data-testid="request-row" data-status={r.status}>
                    <Table.Td>{formatClock(r.startedAt)}</Table.Td>
                    <Table.Td>
                      <Text size="xs" ff="monospace" title={r.id}>{r.id.length > 16 ? `${r.id.slice(0, 16)}…` : r.id}</Text>
                      {r.route && <Text size="xs" c="dimmed">{r.route}</Text>}
                    </Table.Td>
                    <Table.Td style={{ wordBreak: "break-all" }}>{r.model ?? "–"}</Table.Td>
                    <Table.Td style={{ whiteSpace: "nowrap" }}>
                      <Badge style={{ overflow: "visible" }} color={STATUS_COLOR[r.status] ?? "gray"} variant="light">{r.status}</Badge>
                      {r.httpStatus !== null && r.httpStatus >= 400 && <Text span size="xs" c="red"> HTTP {r.httpStatus}</Text>}
                      {r.error && <Text size="xs" c="red">{r.error}</Text>}
                    </Table.Td>
                    <Table.Td ta="right">{formatNumber(r.ttftMs, 0)}</Table.Td>
                    <Table.Td ta="right">{formatNumber(r.tokensPerSecond, 1)}</Table.Td>
                    <Table.Td ta="right">{r.promptTokens ?? "–"} / {r.completionTokens ?? "–"}</Table.Td>
                    <Table.Td ta="right">{r.durationMs !== null ? formatNumber(r.durationMs / 1000, 2) : "–"}</Table.Td>
                  </Table.Tr>
                ))}
              </Table.Tbody>
            </Table>
          </Table.ScrollContainer>
        </Paper>
      )}
    </Stack>
  );
}
