// Asks for the API key when the server first refuses a call (401), once: later refusals while the
// prompt is open only update its message, and a dismissed prompt stays closed until asked for.
import { Button, Group, Modal, PasswordInput, Stack, Text } from "@mantine/core";
import { useEffect, useState } from "react";
import { getApiKey, onAuthRequired, setApiKey } from "../lib/api";

export function ApiKeyPrompt({ openSignal = 0 }: { openSignal?: number }) {
  const [opened, setOpened] = useState(false);
  const [dismissed, setDismissed] = useState(false);
  const [reason, setReason] = useState("");
  const [value, setValue] = useState("");

  useEffect(
    () =>
      onAuthRequired((why) => {
        setReason(why);
        setOpened((open) => open || !dismissed);
      }),
    [dismissed],
  );

  useEffect(() => {
    if (openSignal > 0) {
      setReason(getApiKey() ? "Replace the API key kept for this browser session." : "Enter this server's API key.");
      setOpened(true);
    }
  }, [openSignal]);

  const save = () => {
    if (!value.trim()) return;
    setOpened(false);
    setDismissed(false);
    setApiKey(value.trim());
    setValue("");
  };

  return (
    <Modal
      opened={opened}
      onClose={() => {
        setOpened(false);
        setDismissed(true);
      }}
      title="API key"
      centered
    >
      <form
        onSubmit={(e) => {
          e.preventDefault();
          save();
        }}
      >
        <Stack>
          <Text size="sm" data-testid="api-key-reason">
            {reason}
          </Text>
          <PasswordInput
            label="Key"
            description="Kept in this browser tab's session storage and sent as a Bearer token."
            placeholder="sk-..."
            value={value}
            onChange={(e) => setValue(e.currentTarget.value)}
            data-autofocus
            data-testid="api-key-input"
          />
          <Group justify="flex-end">
            <Button type="submit" disabled={!value.trim()} data-testid="api-key-save">
              Use this key
            </Button>
          </Group>
        </Stack>
      </form>
    </Modal>
  );
}
