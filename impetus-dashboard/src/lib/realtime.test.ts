import { afterEach, describe, expect, it } from "vitest";
import { setApiKey } from "./api";
import { isAuthError, keyQuery } from "./realtime";

describe("the Socket.IO handshake", () => {
  afterEach(() => setApiKey(null));

  it("carries the key in its query, where a browser's WebSocket can send it", () => {
    expect(keyQuery()).toEqual({});
    setApiKey("sk-live-feed-0123456789");
    expect(keyQuery()).toEqual({ api_key: "sk-live-feed-0123456789" });
  });

  it("reads a 401 on the polling handshake as a refused key, not a network error", () => {
    const refused = Object.assign(new Error("xhr poll error"), { description: 401 });
    const offline = Object.assign(new Error("xhr poll error"), { description: 0 });
    const limited = Object.assign(new Error("xhr poll error"), { description: 429 });
    expect(isAuthError(refused)).toBe(true);
    expect(isAuthError(offline)).toBe(false);
    expect(isAuthError(limited)).toBe(false);
    expect(isAuthError(new Error("invalid_api_key: Incorrect API key provided."))).toBe(true);
  });
});
