import { fireEvent, screen, waitFor } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { ModelInfo, ModelsOverview } from "../lib/types";
import { fakeFetch, renderWithMantine } from "../test/render";
import { Models } from "./Models";

afterEach(() => vi.unstubAllGlobals());

// Typed as the server's wire format (generated from /openapi.json): a field it adds or renames fails `tsc` here.
const model = (id: string, state: ModelInfo["state"], extra: Partial<ModelInfo> = {}): ModelInfo => ({
  id, state, kind: "language", format: "mlx", path: `/m/${id}`, size_bytes: 1 << 20,
  memory_bytes: state === "resident" ? 2 << 20 : null, context_length: 512, busy: false, pinned: false, keep_alive: 300,
  idle_seconds: 1, error: null, warmup: null, adapter: null, preset: null, load_options: null, ...extra,
});

describe("Models page", () => {
  it("lists resident and local models, loads one, and hides pulls this server lacks", async () => {
    const fake = fakeFetch({
      "GET /api/models": [200, {
        object: "list", memory_budget_bytes: 8 << 20, memory_used_bytes: 2 << 20,
        data: [model("default", "resident", { pinned: true }), model("tiny-a", "local")],
      } satisfies ModelsOverview],
      "POST /api/models/load": [200, model("tiny-a", "resident")],
    });
    vi.stubGlobal("fetch", fake.fn);
    renderWithMantine(<Models />);

    const row = await screen.findByTestId("model-row-tiny-a");
    expect(row.getAttribute("data-state")).toBe("local");
    expect(screen.getByTestId("model-row-default").textContent).toContain("Unload");
    expect(await screen.findByTestId("pull-unavailable")).toBeTruthy();
    expect(screen.getByTestId("memory-budget").textContent).toContain("2.0 MiB of 8.0 MiB");

    fireEvent.click(row.querySelector('[data-testid="load"]')!);
    await waitFor(() => expect(fake.calls.some((c) => c.method === "POST" && c.path === "/api/models/load")).toBe(true));
    const load = fake.calls.find((c) => c.path === "/api/models/load")!;
    expect(JSON.parse(load.body!)).toEqual({ model: "tiny-a" });
    expect(load.headers.get("Content-Type")).toBe("application/json");
  });
});
