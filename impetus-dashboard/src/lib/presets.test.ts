import { describe, expect, it } from "vitest";
import { emptyPresetForm, presetForm, presetPath, validatePresetForm, type Preset } from "./presets";

const form = (fields: Partial<ReturnType<typeof emptyPresetForm>>) => ({ ...emptyPresetForm("tiny"), name: "coder", ...fields });

describe("validatePresetForm", () => {
  it("builds the preset from the fields set, leaving the blank ones out", () => {
    const { preset, errors } = validatePresetForm(form({
      system: "Be terse.", temperature: "0.2", max_tokens: "64", context_length: "8192", keep_alive: "-1",
      chat_template_kwargs: '{"enable_thinking": false}',
    }));
    expect(errors).toEqual({});
    expect(preset).toEqual({
      name: "coder", model: "tiny", system: "Be terse.", parameters: { temperature: 0.2, max_tokens: 64 },
      context_length: 8192, keep_alive: -1, chat_template_kwargs: { enable_thinking: false },
    });
    expect(validatePresetForm(form({})).preset).toEqual({ name: "coder", model: "tiny" });
  });

  it("names each bad field and sends nothing", () => {
    const { preset, errors } = validatePresetForm({
      ...emptyPresetForm(""), name: "-bad name", temperature: "3", top_p: "0", max_tokens: "1.5",
      context_length: "-2", keep_alive: "soon", chat_template_kwargs: "{enable_thinking: false}",
    });
    expect(preset).toBeNull();
    expect(Object.keys(errors).sort()).toEqual(
      ["chat_template_kwargs", "context_length", "keep_alive", "max_tokens", "model", "name", "temperature", "top_p"],
    );
    expect(errors.chat_template_kwargs).toMatch(/not valid JSON/);
    expect(validatePresetForm(form({ name: "" })).errors.name).toBe("a name is required");
    expect(validatePresetForm(form({ name: "x".repeat(65) })).errors.name).toBeTruthy();
    expect(validatePresetForm(form({ name: "a.b_c-9" })).errors).toEqual({});
  });

  it("wants chat_template_kwargs to be a JSON object", () => {
    for (const text of ["[1]", "null", "true", '"x"']) {
      expect(validatePresetForm(form({ chat_template_kwargs: text })).errors.chat_template_kwargs).toMatch(/JSON object/);
    }
  });

  it("keeps what the form does not show when editing, and drops what it blanked", () => {
    const base: Preset = {
      name: "coder", model: "tiny", description: "d", system: "old", backend: "mlx", chat_template: "{{x}}",
      parameters: { temperature: 0.5, top_k: 40, stop: ["\n"] }, context_length: 4096, keep_alive: 300,
    };
    const edit = { ...presetForm(base), system: "", temperature: "0.9", context_length: "" };
    expect(validatePresetForm(edit, base).preset).toEqual({
      name: "coder", model: "tiny", description: "d", backend: "mlx", chat_template: "{{x}}",
      parameters: { temperature: 0.9, top_k: 40, stop: ["\n"] }, keep_alive: 300,
    });
  });
});

describe("presetPath", () => {
  it("encodes the name", () => {
    expect(presetPath("coder")).toBe("/api/presets/coder");
    expect(presetPath("a b")).toBe("/api/presets/a%20b");
  });
});
