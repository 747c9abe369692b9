// The Models page's presets (/api/presets): list them; create, edit and delete one in a small form that
// validates what it can before asking the server, and shows the server's own message when it refuses.
// Writes need the admin scope: a 401 opens the API key prompt (lib/api.ts), like loading a model.
import { Alert, Button, Group, Modal, Paper, Select, Stack, Table, Text, Textarea, TextInput, Title } from "@mantine/core";
import { useState } from "react";
import { ApiError, apiJson, postJson } from "../lib/api";
import {
  PRESETS_PATH, emptyPresetForm, presetForm, presetPath, validatePresetForm,
  type Preset, type PresetForm, type PresetFormErrors, type PresetList,
} from "../lib/presets";
import { useApi } from "../lib/useApi";

const message = (e: unknown): string => (e instanceof ApiError || e instanceof Error ? e.message : String(e));

function summary(p: Preset): string {
  const parts: string[] = [];
  for (const [key, value] of Object.entries(p.parameters ?? {})) {
    if (value != null) parts.push(`${key} ${Array.isArray(value) ? JSON.stringify(value) : String(value)}`);
  }
  if (p.system) parts.push("system prompt");
  if (p.chat_template_kwargs) parts.push(JSON.stringify(p.chat_template_kwargs));
  return parts.join(" · ") || "–";
}

/** The create / edit form. `editing`: the preset being edited (its name is fixed: PUT /api/presets/<name>). */
export function PresetEditor({ editing, models, onSaved, onClose }: {
  editing: Preset | null;
  models: string[];
  onSaved: (preset: Preset) => void;
  onClose: () => void;
}) {
  const [form, setForm] = useState<PresetForm>(() => (editing ? presetForm(editing) : emptyPresetForm(models[0] ?? "")));
  const [errors, setErrors] = useState<PresetFormErrors>({});
  const [serverError, setServerError] = useState<string | null>(null);
  const [saving, setSaving] = useState(false);
  const field = (name: keyof PresetForm) => ({
    value: form[name],
    error: errors[name],
    onChange: (e: { currentTarget: { value: string } }) => {
      const value = e.currentTarget.value;
      setForm((f) => ({ ...f, [name]: value }));
    },
    "data-testid": `preset-${name.replace(/_/g, "-")}`,
  });

  const save = async () => {
    const { preset, errors: found } = validatePresetForm(form, editing ?? undefined);
    setErrors(found);
    setServerError(null);
    if (!preset) return;
    setSaving(true);
    try {
      const saved = editing
        ? await postJson<Preset>(presetPath(editing.name), preset, "PUT")
        : await postJson<Preset>(PRESETS_PATH, preset);
      onSaved(saved);
    } catch (e) {
      setServerError(message(e)); // the envelope's message: the server names the field it refused
    } finally {
      setSaving(false);
    }
  };

  const choices = form.model && !models.includes(form.model) ? [form.model, ...models] : models;
  return (
    <form onSubmit={(e) => { e.preventDefault(); void save(); }} data-testid="preset-form">
      <Stack gap="sm">
        <TextInput label="Name" description="The model id requests use for it" disabled={!!editing} withAsterisk
          {...field("name")} />
        <Select label="Model" description="The local model it serves" data={choices} value={form.model || null}
          onChange={(v) => setForm((f) => ({ ...f, model: v ?? "" }))} error={errors.model} searchable withAsterisk
          data-testid="preset-model" />
        <Textarea label="System prompt" description="Used when a request has none" autosize minRows={2} maxRows={6}
          {...field("system")} />
        <Group grow>
          <TextInput label="Temperature" placeholder="server default" inputMode="decimal" {...field("temperature")} />
          <TextInput label="Top p" placeholder="server default" inputMode="decimal" {...field("top_p")} />
          <TextInput label="Max tokens" placeholder="server default" inputMode="numeric" {...field("max_tokens")} />
        </Group>
        <Group grow>
          <TextInput label="Context length" placeholder="server default" inputMode="numeric" {...field("context_length")} />
          <TextInput label="Keep alive (s)" placeholder="server default" inputMode="numeric" {...field("keep_alive")} />
        </Group>
        <Textarea label="Chat template kwargs (JSON)" placeholder='{"enable_thinking": false}' autosize minRows={1}
          maxRows={6} styles={{ input: { fontFamily: "monospace" } }} {...field("chat_template_kwargs")} />
        {serverError && <Alert color="red" data-testid="preset-error">{serverError}</Alert>}
        <Group justify="flex-end">
          <Button variant="subtle" onClick={onClose}>Cancel</Button>
          <Button type="submit" loading={saving} data-testid="preset-save">{editing ? "Save" : "Create"}</Button>
        </Group>
      </Stack>
    </form>
  );
}

export function PresetsPanel({ models, onChange }: { models: string[]; onChange: () => void }) {
  const presets = useApi<PresetList>(PRESETS_PATH, 30000);
  const [editing, setEditing] = useState<Preset | "new" | null>(null);
  const [error, setError] = useState<string | null>(null);
  if (presets.missing) {
    return <Text size="sm" c="dimmed" data-testid="presets-unavailable">Presets: not available on this server.</Text>;
  }
  const list = presets.data?.presets ?? [];

  const remove = async (p: Preset) => {
    if (!window.confirm(`Delete the preset ${p.name}?`)) return;
    setError(null);
    try {
      await apiJson(presetPath(p.name), { method: "DELETE" });
    } catch (e) {
      setError(`delete ${p.name}: ${message(e)}`);
    } finally {
      presets.reload();
      onChange();
    }
  };

  return (
    <Paper withBorder p="md" radius="md" data-testid="presets-panel">
      <Group justify="space-between" mb="sm">
        <Title order={4}>Presets</Title>
        <Button size="xs" variant="light" onClick={() => { setError(null); setEditing("new"); }} data-testid="preset-new">
          New preset
        </Button>
      </Group>
      {error && <Alert color="red" mb="sm" withCloseButton onClose={() => setError(null)} data-testid="presets-error">{error}</Alert>}
      {presets.error && !presets.data && <Text c="red" size="sm">{presets.error.message}</Text>}
      {presets.data && list.length === 0 && (
        <Text size="sm" c="dimmed">No presets: one names a model with its own defaults (sampling, system prompt, context).</Text>
      )}
      {list.length > 0 && (
        <Table.ScrollContainer minWidth={600}>
          <Table striped data-testid="presets-table">
            <Table.Thead>
              <Table.Tr>
                <Table.Th>Preset</Table.Th><Table.Th>Model</Table.Th><Table.Th>Defaults</Table.Th>
                <Table.Th>Context</Table.Th><Table.Th />
              </Table.Tr>
            </Table.Thead>
            <Table.Tbody>
              {list.map((p) => (
                <Table.Tr key={p.name} data-testid={`preset-row-${p.name}`}>
                  <Table.Td><Text fw={500}>{p.name}</Text>{p.description && <Text size="xs" c="dimmed">{p.description}</Text>}</Table.Td>
                  <Table.Td><Text size="sm">{p.model}</Text></Table.Td>
                  <Table.Td><Text size="xs">{summary(p)}</Text></Table.Td>
                  <Table.Td>{p.context_length || "–"}</Table.Td>
                  <Table.Td>
                    <Group gap="xs" justify="flex-end" wrap="nowrap">
                      <Button size="compact-xs" variant="light" onClick={() => { setError(null); setEditing(p); }} data-testid="preset-edit">
                        Edit
                      </Button>
                      <Button size="compact-xs" variant="subtle" color="red" onClick={() => void remove(p)} data-testid="preset-delete">
                        Delete
                      </Button>
                    </Group>
                  </Table.Td>
                </Table.Tr>
              ))}
            </Table.Tbody>
          </Table>
        </Table.ScrollContainer>
      )}
      <Modal opened={editing !== null} onClose={() => setEditing(null)} centered size="lg"
        title={editing === "new" ? "New preset" : editing ? `Edit ${editing.name}` : ""}>
        {editing !== null && (
          <PresetEditor editing={editing === "new" ? null : editing}
            models={models.filter((id) => !list.some((p) => p.name === id))} onClose={() => setEditing(null)}
            onSaved={() => { setEditing(null); presets.reload(); onChange(); }} />
        )}
      </Modal>
    </Paper>
  );
}
