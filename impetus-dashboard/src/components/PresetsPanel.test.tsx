import { fireEvent, screen, waitFor, within } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { Preset } from "../lib/presets";
import { fakeFetch, renderWithMantine } from "../test/render";
import { PresetsPanel } from "./PresetsPanel";

afterEach(() => vi.unstubAllGlobals());

const coder: Preset = {
  name: "coder", model: "tiny", system: "Be terse.", parameters: { temperature: 0.2, top_k: 40 }, context_length: 4096,
  backend: "auto",
};
const type = (testid: string, value: string) => fireEvent.change(screen.getByTestId(testid), { target: { value } });

describe("PresetsPanel", () => {
  it("lists presets; a bad field is named before any request, the server's refusal is shown as it says", async () => {
    const conflict = { error: { message: "'tiny' is a local model's id: a preset needs a name of its own.", type: "invalid_request_error", param: "name", code: "preset_conflict" } };
    const fake = fakeFetch({ "GET /api/presets": [200, { presets: [coder] }], "POST /api/presets": [409, conflict] });
    vi.stubGlobal("fetch", fake.fn);
    renderWithMantine(<PresetsPanel models={["tiny", "other"]} onChange={() => undefined} />);

    const row = await screen.findByTestId("preset-row-coder");
    expect(row.textContent).toContain("tiny");
    expect(row.textContent).toContain("temperature 0.2");
    fireEvent.click(screen.getByTestId("preset-new"));
    await screen.findByTestId("preset-form");
    type("preset-name", "tiny");
    type("preset-temperature", "5");
    type("preset-chat-template-kwargs", "{oops");
    fireEvent.click(screen.getByTestId("preset-save"));
    expect(await screen.findByText("a number from 0 to 2")).toBeTruthy();
    expect(screen.getByText(/not valid JSON/)).toBeTruthy();
    expect(fake.calls.filter((c) => c.method === "POST")).toHaveLength(0);

    type("preset-temperature", "0.3");
    type("preset-chat-template-kwargs", '{"enable_thinking": false}');
    fireEvent.click(screen.getByTestId("preset-save"));
    expect((await screen.findByTestId("preset-error")).textContent).toBe(conflict.error.message);
    const post = fake.calls.find((c) => c.method === "POST")!;
    expect(JSON.parse(post.body!)).toEqual({
      name: "tiny", model: "tiny", parameters: { temperature: 0.3 }, chat_template_kwargs: { enable_thinking: false },
    });
    expect(screen.getByTestId("preset-form")).toBeTruthy(); // still open, to correct
  });

  it("edits with PUT, keeping the fields the form does not show, and deletes", async () => {
    const edited = { ...coder, parameters: { temperature: 0.2, top_k: 40, max_tokens: 99 } };
    const fake = fakeFetch({
      "GET /api/presets": [200, { presets: [coder] }],
      "PUT /api/presets/coder": [200, edited],
      "DELETE /api/presets/coder": [200, { name: "coder", deleted: true }],
    });
    vi.stubGlobal("fetch", fake.fn);
    const onChange = vi.fn();
    vi.stubGlobal("confirm", () => true);
    renderWithMantine(<PresetsPanel models={["tiny"]} onChange={onChange} />);

    const row = await screen.findByTestId("preset-row-coder");
    fireEvent.click(within(row).getByTestId("preset-edit"));
    await screen.findByTestId("preset-form");
    expect(screen.getByTestId<HTMLInputElement>("preset-name").disabled).toBe(true);
    expect(screen.getByTestId<HTMLTextAreaElement>("preset-system").value).toBe("Be terse.");
    type("preset-max-tokens", "99");
    fireEvent.click(screen.getByTestId("preset-save"));
    await waitFor(() => expect(screen.queryByTestId("preset-form")).toBeNull());
    const put = fake.calls.find((c) => c.method === "PUT")!;
    expect(JSON.parse(put.body!)).toEqual(edited);
    expect(onChange).toHaveBeenCalled();

    fireEvent.click(within(screen.getByTestId("preset-row-coder")).getByTestId("preset-delete"));
    await waitFor(() => expect(fake.calls.some((c) => c.method === "DELETE" && c.path === "/api/presets/coder")).toBe(true));
  });

  it("says so when the server has no presets", async () => {
    vi.stubGlobal("fetch", fakeFetch({}).fn);
    renderWithMantine(<PresetsPanel models={[]} onChange={() => undefined} />);
    expect(await screen.findByTestId("presets-unavailable")).toBeTruthy();
  });
});
