import { MantineProvider } from "@mantine/core";
import { render } from "@testing-library/react";
import type { ReactNode } from "react";

export function renderWithMantine(ui: ReactNode) {
  return render(<MantineProvider>{ui}</MantineProvider>);
}

/** A fetch stand-in: `routes` maps "METHOD /path" to a status and JSON body; every call is recorded. */
export function fakeFetch(routes: Record<string, [number, unknown]>) {
  const calls: { method: string; path: string; headers: Headers; body: string | null }[] = [];
  const fn = (input: RequestInfo | URL, init: RequestInit = {}): Promise<Response> => {
    const path = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    const method = (init.method ?? "GET").toUpperCase();
    calls.push({ method, path, headers: new Headers(init.headers), body: (init.body as string) ?? null });
    const [status, body] = routes[`${method} ${path}`] ?? [404, { error: { message: "not found", code: "not_found" } }];
    return Promise.resolve(new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } }));
  };
  return { fn, calls };
}
