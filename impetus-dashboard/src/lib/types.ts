// The wire formats the dashboard reads and sends: names for the types generated from the server's
// OpenAPI document (../api/schema.d.ts, `make dashboard-types`), which pydantic's schemas define
// (gerdsen_ai_server's schemas package). Never written by hand: a field the server adds, renames or
// drops shows up here when the types are regenerated, and `tsc` names every place it matters.
import type { components } from "../api/schema";

type Schemas = components["schemas"];

/** A request's body. openapi-typescript makes every field that has a default required: right for the
 * responses, which always carry them, but a request may leave them out. So all but the fields `R`
 * that the server requires are optional. */
export type RequestBody<T, R extends keyof T> = Pick<T, R> & Partial<Omit<T, R>>;

// /api/models and its neighbours
export type ModelInfo = Schemas["ModelInfo"];
export type ModelsOverview = Schemas["ModelsOverview"];
export type LoadRequest = RequestBody<Schemas["LoadRequest"], "model">;
export type UnloadRequest = RequestBody<Schemas["UnloadRequest"], "model">;
export type PullRequest = RequestBody<Schemas["PullRequest"], "model">;
export type PullStatus = Schemas["PullStatus"];
export type PullList = Schemas["PullList"];
export type DiscoveredModel = Schemas["DiscoveredModel"];
export type DiscoverResponse = Schemas["DiscoverResponse"];

// /v1 (OpenAI)
export type ModelList = Schemas["ModelList"];

// Monitoring: /health, /api/hardware (also the Socket.IO `hardware` event), /api/config
export type Health = Schemas["HealthReport"];
export type HardwareReport = Schemas["HardwareReport"];
export type ConfigEntry = Schemas["ConfigEntry"];
export type ConfigList = Schemas["ConfigList"];
