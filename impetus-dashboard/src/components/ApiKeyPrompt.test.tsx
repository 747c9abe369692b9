import { fireEvent, screen, waitFor } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { apiJson, getApiKey, setApiKey } from "../lib/api";
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

  it("stops calling with a refused key until another is entered", async () => {
    const unauthorized = { error: { message: "Incorrect API key provided.", code: "invalid_api_key" } };
    const fake = fakeFetch({ "GET /api/models": [401, unauthorized] });
    vi.stubGlobal("fetch", fake.fn);
    setApiKey("sk-wrong-key-0123456789");
    await apiJson("/api/models").catch(() => undefined);
    const sent = fake.calls.length;
    await Promise.allSettled([apiJson("/api/models"), apiJson("/api/models")]); // polling on: nothing sent
    expect(fake.calls.length).toBe(sent);

    setApiKey("sk-another-key-0123456789");
    await apiJson("/api/models").catch(() => undefined);
    expect(fake.calls.length).toBe(sent + 1);
    expect(fake.calls.at(-1)?.headers.get("Authorization")).toBe("Bearer sk-another-key-0123456789");
  });
});
