import { describe, expect, it } from "vitest";
import { endpoints } from "./endpoints";

describe("endpoints", () => {
  it("fills path parameters, encoding each segment of a model id but keeping its slashes", () => {
    expect(endpoints.model("mlx-community/Qwen2.5 0.5B")).toBe("/api/models/mlx-community/Qwen2.5%200.5B");
    expect(endpoints.model("tiny-a")).toBe("/api/models/tiny-a");
    expect(endpoints.pullById("pull-0123abcd")).toBe("/api/models/pulls/pull-0123abcd");
  });

  it("adds the discover query only when there is one", () => {
    expect(endpoints.discover("")).toBe("/api/models/discover");
    expect(endpoints.discover("qwen 2.5&x")).toBe("/api/models/discover?q=qwen%202.5%26x");
  });

  it("names the load and unload actions by the Models page's action", () => {
    expect(endpoints.modelAction.load).toBe("/api/models/load");
    expect(endpoints.modelAction.unload).toBe("/api/models/unload");
  });
});
