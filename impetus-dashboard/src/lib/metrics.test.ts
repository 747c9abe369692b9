import { describe, expect, it } from "vitest";
import { appendBounded, applyRequestEvent, meanTtft, sampleFromMetrics } from "./metrics";

describe("sampleFromMetrics", () => {
  it("reads the monitor's payload", () => {
    const sample = sampleFromMetrics(
      {
        timestamp: 1_700_000_000.5,
        tokens_per_second: 42.5,
        engine: { queued_sequences: 3, requests_in_flight: 5, active_sequences: 2 },
        system: { cpu_percent: 37, memory_used_percent: 61.2 },
        process: { rss_bytes: 1024, cpu_percent: 12 },
        thermal_state: "nominal",
      },
      1_700_000_000_600,
    );
    expect(sample).toMatchObject({
      t: 1_700_000_000_500,
      tokensPerSecond: 42.5,
      queueDepth: 3,
      activeRequests: 5,
      cpuPercent: 37,
      memoryPercent: 61.2,
      thermalState: "nominal",
      latencyMs: 100,
    });
  });

  it("gives nulls, not errors, for what a server leaves out", () => {
    const sample = sampleFromMetrics({}, 5000);
    expect(sample.t).toBe(5000);
    expect(sample.tokensPerSecond).toBeNull();
    expect(sample.thermalState).toBeNull();
  });
});

describe("recent requests", () => {
  it("merges started and finished events of one request, newest first, bounded", () => {
    let list = applyRequestEvent([], { event: "started", request_id: "a", model: "m", timestamp: 1 }, 2);
    list = applyRequestEvent(list, { event: "started", request_id: "b", timestamp: 2 }, 2);
    list = applyRequestEvent(
      list,
      { event: "finished", request_id: "a", ttft_s: 0.25, tokens_per_second: 30, outcome: "finished", timestamp: 3 },
      2,
    );
    expect(list.map((r) => r.id)).toEqual(["a", "b"]);
    expect(list[0]).toMatchObject({ model: "m", status: "finished", ttftMs: 250, tokensPerSecond: 30, startedAt: 1000 });
    expect(list[1].status).toBe("running");
    list = applyRequestEvent(list, { event: "started", request_id: "c", timestamp: 4 }, 2);
    expect(list.map((r) => r.id)).toEqual(["c", "a"]);
    expect(meanTtft(list, 2000, 3000)).toBe(250);
  });

  it("keeps at most max samples", () => {
    let list: number[] = [];
    for (let i = 0; i < 5; i++) list = appendBounded(list, i, 3);
    expect(list).toEqual([2, 3, 4]);
  });
});
