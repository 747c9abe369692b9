// Wire formats of /api/models (gerdsen_ai_server/schemas/registry.py and schemas/models.py).

export interface ModelInfo {
  id: string;
  state: "resident" | "local";
  format: string | null;
  path: string | null;
  size_bytes: number | null;
  memory_bytes: number | null;
  context_length: number | null;
  busy: boolean;
  pinned: boolean;
  keep_alive: number | null;
  idle_seconds: number | null;
  error: string | null;
}

export interface ModelsOverview {
  object: "list";
  data: ModelInfo[];
  memory_budget_bytes: number;
  memory_used_bytes: number;
}

export interface PullStatus {
  id: string;
  model: string;
  revision: string;
  status: "queued" | "downloading" | "done" | "failed" | "cancelled";
  bytes_done: number;
  bytes_total: number | null;
  path: string | null;
  error: string | null;
  created_at: number;
  finished_at: number | null;
}

export interface DiscoveredModel {
  id: string;
  source: "catalogue" | "hub";
  description: string | null;
  parameters: number | null;
  quantization: string | null;
  size_bytes: number | null;
  memory_bytes: number | null;
  fits: boolean | null;
  downloads: number | null;
  local: boolean;
}

export interface DiscoverResponse {
  source: "catalogue" | "hub";
  query: string | null;
  memory_budget_bytes: number;
  hub_error: string | null;
  data: DiscoveredModel[];
}

export interface Health {
  status: string;
  ready?: boolean;
  reason?: string;
  version: string;
  pid?: number;
  uptime_s: number;
  engine_alive?: boolean;
  requests_in_flight: number;
  compute_dtype: string;
  blas: string;
  allocator?: string;
  prompt_cache_enabled?: boolean;
  prompt_cache_bytes?: number;
  prompt_cache_limit_bytes?: number;
  max_batch?: number;
  batch_limit?: number | null;
  thermal_state?: string | null;
  models: { id: string; path: string; context_length: number | null; bytes: number }[];
}
