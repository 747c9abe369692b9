// The Socket.IO feed, normalised for the charts: one Sample per `metrics` event, one RequestRecord
// per request (`request_event` started / finished). Fields are read defensively: a server that
// sends fewer of them gives gaps in a chart, never an error.

type Json = Record<string, unknown>;

export interface Sample {
  t: number; // server time, ms since the epoch
  tokensPerSecond: number | null;
  ttftMs: number | null;
  queueDepth: number | null;
  activeRequests: number | null;
  cpuPercent: number | null;
  memoryPercent: number | null;
  processRssBytes: number | null;
  thermalState: string | null;
  latencyMs: number | null; // server emit to browser receipt
}

export interface RequestRecord {
  id: string;
  model: string | null;
  route: string | null;
  status: string;
  startedAt: number;
  finishedAt: number | null;
  ttftMs: number | null;
  tokensPerSecond: number | null;
  promptTokens: number | null;
  completionTokens: number | null;
  httpStatus: number | null;
  durationMs: number | null;
  error: string | null;
}

function num(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function str(value: unknown): string | null {
  return typeof value === "string" && value ? value : null;
}

function obj(value: unknown): Json {
  return value && typeof value === "object" ? (value as Json) : {};
}

/** Seconds or milliseconds since the epoch, or nothing, to ms. */
export function toMillis(value: unknown, fallback: number): number {
  const n = num(value);
  if (n === null) return fallback;
  return n < 1e11 ? n * 1000 : n;
}

export function sampleFromMetrics(payload: unknown, receivedAt = Date.now()): Sample {
  const p = obj(payload);
  const engine = obj(p.engine);
  const system = obj(p.system);
  const process = obj(p.process);
  const t = toMillis(p.timestamp, receivedAt);
  const ttftSeconds = num(p.ttft_s) ?? num(p.ttft_seconds_recent);
  return {
    t,
    tokensPerSecond: num(p.tokens_per_second),
    ttftMs: ttftSeconds !== null ? ttftSeconds * 1000 : num(p.ttft_ms),
    queueDepth: num(engine.queued_sequences) ?? num(p.queue_depth),
    activeRequests: num(engine.requests_in_flight) ?? num(engine.active_sequences) ?? num(p.active_requests),
    cpuPercent: num(system.cpu_percent) ?? num(process.cpu_percent),
    memoryPercent: num(system.memory_used_percent),
    processRssBytes: num(process.rss_bytes),
    thermalState: str(p.thermal_state),
    latencyMs: p.timestamp != null ? Math.max(0, receivedAt - t) : null,
  };
}

/** Append, keeping the last `max` samples (a new array: React state). */
export function appendBounded<T>(list: T[], item: T, max: number): T[] {
  const next = list.length >= max ? list.slice(list.length - max + 1) : list.slice();
  next.push(item);
  return next;
}

/** Merge a `request_event` into the recent requests (newest first, at most `max`). */
export function applyRequestEvent(list: RequestRecord[], payload: unknown, max: number, now = Date.now()): RequestRecord[] {
  const p = obj(payload);
  const id = str(p.request_id) ?? str(p.id) ?? `req-${now}-${list.length}`;
  const phase = str(p.event) ?? str(p.phase) ?? (p.ttft_s !== undefined || p.outcome ? "finished" : "started");
  const t = toMillis(p.timestamp, now);
  const existing = list.find((r) => r.id === id);
  const ttftS = num(p.ttft_s);
  const record: RequestRecord = {
    id,
    model: str(p.model) ?? existing?.model ?? null,
    route: str(p.route) ?? str(p.endpoint) ?? existing?.route ?? null,
    status: statusOf(phase, p) ?? existing?.status ?? "running",
    startedAt: existing?.startedAt ?? t,
    finishedAt: phase === "started" ? null : t,
    ttftMs: ttftS !== null ? ttftS * 1000 : num(p.ttft_ms) ?? existing?.ttftMs ?? null,
    tokensPerSecond: num(p.tokens_per_second) ?? existing?.tokensPerSecond ?? null,
    promptTokens: num(p.prompt_tokens) ?? existing?.promptTokens ?? null,
    completionTokens: num(p.completion_tokens) ?? existing?.completionTokens ?? null,
    httpStatus: num(p.status) ?? existing?.httpStatus ?? null,
    durationMs: num(p.duration_s) !== null ? (num(p.duration_s) as number) * 1000 : existing?.durationMs ?? null,
    error: str(p.error) ?? existing?.error ?? null,
  };
  const rest = list.filter((r) => r.id !== id);
  return [record, ...rest].slice(0, max);
}

function statusOf(phase: string, p: Json): string | null {
  if (phase === "started") return "running";
  const outcome = str(p.outcome) ?? str(p.status) ?? str(p.finish_reason);
  if (outcome) return outcome;
  return phase === "finished" ? "finished" : phase;
}

/** Mean TTFT of the requests that finished in (from, to]: the TTFT chart when metrics carry none. */
export function meanTtft(requests: RequestRecord[], from: number, to: number): number | null {
  const values = requests
    .filter((r) => r.finishedAt !== null && r.finishedAt > from && r.finishedAt <= to && r.ttftMs !== null)
    .map((r) => r.ttftMs as number);
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}
