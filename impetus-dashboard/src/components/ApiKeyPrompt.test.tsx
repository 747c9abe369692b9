import { fireEvent, screen, waitFor } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { apiJson, getApiKey } from "../lib/api";
import { fakeFetch, renderWithMantine } from "../test/render";
import { ApiKeyPrompt } from "./ApiKeyPrompt";

afterEach(() => vi.unstubAllGlobals());

describe("ApiKeyPrompt", () => {
  it("asks for the key once on 401, keeps it for the session, sends it as Bearer", async () => {
    const unauthorized = { error: { message: "Incorrect API key provided.", code: "invalid_api_key" } };
    const fake = fakeFetch({ "GET /api/models": [401, unauthorized] });
    vi.stubGlobal("fetch", fake.fn);
    renderWithMantine(<ApiKeyPrompt />);

    await Promise.allSettled([apiJson("/api/models"), apiJson("/api/models")]); // two refusals, one prompt
    expect(await screen.findAllByTestId("api-key-input")).toHaveLength(1);
    expect(screen.getByTestId("api-key-reason").textContent).toContain("needs an API key");

    fireEvent.change(screen.getByTestId("api-key-input"), { target: { value: "sk-secret" } });
    fireEvent.click(screen.getByTestId("api-key-save"));
    expect(getApiKey()).toBe("sk-secret");
    expect(sessionStorage.getItem("impetus.apiKey")).toBe("sk-secret");
    await waitFor(() => expect(screen.queryByTestId("api-key-input")).toBeNull());

    await apiJson("/api/models").catch(() => undefined);
    expect(fake.calls.at(-1)?.headers.get("Authorization")).toBe("Bearer sk-secret");
    expect(fake.calls[0].headers.get("Authorization")).toBeNull();
  });
});
