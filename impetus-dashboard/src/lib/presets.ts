// Presets (/api/presets): named request defaults and load options for a model, as Ollama's Modelfile and
// LM Studio's load presets keep them. Narrow local types for what the dashboard reads and sends, until the
// server's schemas reach the generated ../api/schema.d.ts (`make dashboard-types`); and the preset form's
// client-side validation, so an obviously wrong value is named before the server is asked.

/** Request defaults a preset carries; a request's explicit fields win over each. */
export interface PresetParameters {
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  min_p?: number | null;
  max_tokens?: number | null;
  stop?: string[] | null;
  seed?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  repetition_penalty?: number | null;
}

export interface Preset {
  name: string;
  model: string;
  description?: string | null;
  parameters?: PresetParameters | null;
  system?: string | null;
  chat_template?: string | null;
  chat_template_kwargs?: Record<string, unknown> | null;
  context_length?: number | null;
  rope_scaling?: boolean | null;
  keep_alive?: number | null;
  backend?: string | null;
  adapter?: string | null;
}

export interface PresetList {
  presets: Preset[];
}

// Not yet in the generated OpenAPI paths (endpoints.ts checks those): plain strings until they are.
export const PRESETS_PATH = "/api/presets";
export const presetPath = (name: string): string => `${PRESETS_PATH}/${encodeURIComponent(name)}`;

/** The server's rule for a preset's name (it is also the file's stem and the model id requests use). */
export const PRESET_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** The form's fields, as typed (strings: an empty one means "not set"). */
export interface PresetForm {
  name: string;
  model: string;
  system: string;
  temperature: string;
  top_p: string;
  max_tokens: string;
  context_length: string;
  keep_alive: string;
  chat_template_kwargs: string;
}

export type PresetFormErrors = Partial<Record<keyof PresetForm, string>>;

export const emptyPresetForm = (model = ""): PresetForm => ({
  name: "", model, system: "", temperature: "", top_p: "", max_tokens: "", context_length: "", keep_alive: "",
  chat_template_kwargs: "",
});

const text = (value: number | null | undefined): string => (value == null ? "" : String(value));

/** The form showing an existing preset (fields the form does not edit are kept by validatePresetForm's `base`). */
export function presetForm(preset: Preset): PresetForm {
  const p = preset.parameters ?? {};
  return {
    name: preset.name,
    model: preset.model,
    system: preset.system ?? "",
    temperature: text(p.temperature),
    top_p: text(p.top_p),
    max_tokens: text(p.max_tokens),
    context_length: text(preset.context_length),
    keep_alive: text(preset.keep_alive),
    chat_template_kwargs: preset.chat_template_kwargs ? JSON.stringify(preset.chat_template_kwargs, null, 2) : "",
  };
}

type NumberRule = { min?: number; max?: number; above?: number; integer?: boolean; hint: string };

/** undefined when blank, the number when it passes `rule`, else the error message. */
function numberField(raw: string, rule: NumberRule): { value?: number; error?: string } {
  const trimmed = raw.trim();
  if (!trimmed) return {};
  const value = Number(trimmed);
  const bad =
    !Number.isFinite(value) ||
    (rule.integer && !Number.isInteger(value)) ||
    (rule.min !== undefined && value < rule.min) ||
    (rule.max !== undefined && value > rule.max) ||
    (rule.above !== undefined && value <= rule.above);
  return bad ? { error: rule.hint } : { value };
}

const RULES: Record<"temperature" | "top_p" | "max_tokens" | "context_length" | "keep_alive", NumberRule> = {
  temperature: { min: 0, max: 2, hint: "a number from 0 to 2" },
  top_p: { above: 0, max: 1, hint: "a number above 0, at most 1" },
  max_tokens: { min: 1, integer: true, hint: "a whole number, at least 1" },
  context_length: { min: 0, integer: true, hint: "a whole number of tokens (0: the server's default)" },
  keep_alive: { hint: "seconds (a negative number keeps it loaded)" },
};

/**
 * The preset the form describes, or the errors that keep it from being sent. `base` (the preset being
 * edited) keeps what the form does not show (top_k, stop, a template override, backend, adapter…); a blank
 * field drops that setting, so the server's or the request's value applies.
 */
export function validatePresetForm(form: PresetForm, base?: Preset): { preset: Preset | null; errors: PresetFormErrors } {
  const errors: PresetFormErrors = {};
  const name = form.name.trim();
  if (!PRESET_NAME.test(name)) {
    errors.name = name
      ? "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64"
      : "a name is required";
  }
  const model = form.model.trim();
  if (!model) errors.model = "choose the model it serves";

  const numbers: Partial<Record<keyof typeof RULES, number>> = {};
  for (const field of Object.keys(RULES) as (keyof typeof RULES)[]) {
    const { value, error } = numberField(form[field], RULES[field]);
    if (error) errors[field] = error;
    else if (value !== undefined) numbers[field] = value;
  }

  let kwargs: Record<string, unknown> | undefined;
  if (form.chat_template_kwargs.trim()) {
    try {
      const parsed: unknown = JSON.parse(form.chat_template_kwargs);
      if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
        errors.chat_template_kwargs = 'a JSON object, e.g. {"enable_thinking": false}';
      } else {
        kwargs = parsed as Record<string, unknown>;
      }
    } catch (e) {
      errors.chat_template_kwargs = `not valid JSON: ${(e as Error).message}`;
    }
  }
  if (Object.keys(errors).length) return { preset: null, errors };

  const { system: _s, chat_template_kwargs: _k, context_length: _c, keep_alive: _a, parameters, ...kept } = base ?? {};
  const { temperature: _t, top_p: _p, max_tokens: _m, ...otherParams } = parameters ?? {};
  const preset: Preset = { ...kept, name, model };
  const params: PresetParameters = { ...otherParams };
  if (numbers.temperature !== undefined) params.temperature = numbers.temperature;
  if (numbers.top_p !== undefined) params.top_p = numbers.top_p;
  if (numbers.max_tokens !== undefined) params.max_tokens = numbers.max_tokens;
  if (Object.keys(params).length) preset.parameters = params;
  if (form.system.trim()) preset.system = form.system;
  if (kwargs) preset.chat_template_kwargs = kwargs;
  if (numbers.context_length !== undefined) preset.context_length = numbers.context_length;
  if (numbers.keep_alive !== undefined) preset.keep_alive = numbers.keep_alive;
  return { preset, errors };
}
