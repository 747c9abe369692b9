import { fireEvent, screen, waitFor } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { DiscoveredModel, DiscoverResponse, ModelInfo, ModelsOverview } from "../lib/types";
import { fakeFetch, renderWithMantine } from "../test/render";
import { Models } from "./Models";

afterEach(() => vi.unstubAllGlobals());

// Typed as the server's wire format (generated from /openapi.json): a field it adds or renames fails `tsc` here.
const model = (id: string, state: ModelInfo["state"], extra: Partial<ModelInfo> = {}): ModelInfo => ({
  id, state, kind: "language", format: "mlx", path: `/m/${id}`, size_bytes: 1 << 20,
  memory_bytes: state === "resident" ? 2 << 20 : null, context_length: 512, busy: false, pinned: false, keep_alive: 300,
  idle_seconds: 1, error: null, warmup: null, adapter: null, preset: null, load_options: null,
  compute_dtype: null, compute_dtype_reason: null, vision: false, ...extra,
});

describe("Models page", () => {
  it("lists resident and local models, loads one, and hides pulls this server lacks", async () => {
    const fake = fakeFetch({
      "GET /api/models": [200, {
        object: "list", memory_budget_bytes: 8 << 20, memory_used_bytes: 2 << 20,
        data: [
          model("default", "resident", { pinned: true, compute_dtype: "quantized-float32", compute_dtype_reason: "r" }),
          model("tiny-a", "local"),
        ],
      } satisfies ModelsOverview],
      "POST /api/models/load": [200, model("tiny-a", "resident")],
    });
    vi.stubGlobal("fetch", fake.fn);
    renderWithMantine(<Models />);

    const row = await screen.findByTestId("model-row-tiny-a");
    expect(row.getAttribute("data-state")).toBe("local");
    expect(screen.getByTestId("model-row-default").textContent).toContain("Unload");
    expect(screen.getByTestId("model-row-default").textContent).toContain("quantized-float32");
    expect(await screen.findByTestId("pull-unavailable")).toBeTruthy();
    expect(screen.getByTestId("memory-budget").textContent).toContain("2.0 MiB of 8.0 MiB");

    fireEvent.click(row.querySelector('[data-testid="load"]')!);
    await waitFor(() => expect(fake.calls.some((c) => c.method === "POST" && c.path === "/api/models/load")).toBe(true));
    const load = fake.calls.find((c) => c.path === "/api/models/load")!;
    expect(JSON.parse(load.body!)).toEqual({ model: "tiny-a" });
    expect(load.headers.get("Content-Type")).toBe("application/json");
  });

  it("shows each recommendation's memory here and pulls the faster GGUF build by its file", async () => {
    const card = (id: string, extra: Partial<DiscoveredModel>): DiscoveredModel => ({
      id, source: "catalogue", description: null, parameters: 4e9, quantization: "4bit", size_bytes: 2 * 2 ** 30,
      memory_bytes: 2 * 2 ** 30, fits: true, downloads: null, local: false, format: "mlx", file: null, backend: "mlx",
      compute_dtype: "as stored", context_length: 4096, faster: false, memory_note: "the weights", vision: false,
      ...extra,
    });
    const fake = fakeFetch({
      "GET /api/models": [200, { object: "list", memory_budget_bytes: 8 * 2 ** 30, memory_used_bytes: 0, data: [] }],
      "GET /api/models/pulls": [200, { object: "list", data: [] }],
      "GET /api/models/discover": [200, {
        object: "list", source: "catalogue", query: null, memory_budget_bytes: 8 * 2 ** 30, hub_error: null, data: [
          card("org/Q-GGUF", { format: "gguf", file: "Q-Q4_K_M.gguf", backend: "llamacpp", faster: true, vision: true }),
          card("mlx-community/Q-4bit", { memory_bytes: 3 * 2 ** 30 }),
        ],
      } satisfies DiscoverResponse],
      "POST /api/models/pull": [202, {}],
    });
    vi.stubGlobal("fetch", fake.fn);
    renderWithMantine(<Models />);

    const gguf = await screen.findByTestId("discover-row-org/Q-GGUF");
    expect(gguf.textContent).toContain("faster here");
    expect(gguf.textContent).toContain("Q-Q4_K_M.gguf");
    const mlx = screen.getByTestId("discover-row-mlx-community/Q-4bit");
    expect(mlx.textContent).toContain("3.0 GiB");
    expect(mlx.textContent).toContain("as stored");
    expect(mlx.querySelector('[data-testid="faster"]')).toBeNull();
    expect(gguf.querySelector('[data-testid="discover-vision"]')).not.toBeNull();  // a vision build (issue 30)
    expect(mlx.querySelector('[data-testid="discover-vision"]')).toBeNull();

    fireEvent.click(gguf.querySelector("button")!);
    await waitFor(() => expect(fake.calls.some((c) => c.path === "/api/models/pull")).toBe(true));
    const pull = fake.calls.find((c) => c.path === "/api/models/pull")!;
    expect(JSON.parse(pull.body!)).toEqual({ model: "org/Q-GGUF", gguf: "Q-Q4_K_M.gguf" });
  });

  it("marks vision models", async () => {
    const fake = fakeFetch({
      "GET /api/models": [200, {
        object: "list", memory_budget_bytes: 8 << 20, memory_used_bytes: 0,
        data: [model("eye", "local", { vision: true }), model("tiny-a", "local")],
      } satisfies ModelsOverview],
    });
    vi.stubGlobal("fetch", fake.fn);
    renderWithMantine(<Models />);
    expect((await screen.findByTestId("model-row-eye")).querySelector('[data-testid="vision"]')!.textContent).toBe("vision");
    expect(screen.getByTestId("model-row-tiny-a").querySelector('[data-testid="vision"]')).toBeNull();
  });
});
