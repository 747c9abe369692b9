// A reply's thinking, apart from its answer: a "Thinking" disclosure above the answer, open while it
// streams (you watch the model think), collapsed once the reply is done, with its length, and open again
// on a click. Open WebUI and LM Studio show reasoning the same way.
import { Box, Text, UnstyledButton } from "@mantine/core";
import { useEffect, useState } from "react";

export function Reasoning({ text, streaming = false }: { text: string; streaming?: boolean }) {
  const [open, setOpen] = useState(streaming);
  useEffect(() => setOpen(streaming), [streaming]);
  const words = text.trim() ? text.trim().split(/\s+/).length : 0;
  return (
    <Box data-testid="reasoning" data-open={open ? "true" : "false"} mb={6}
      style={{ borderLeft: "2px solid var(--mantine-color-gray-4)", paddingLeft: 8 }}>
      <UnstyledButton onClick={() => setOpen((o) => !o)} aria-expanded={open} data-testid="reasoning-toggle">
        <Text size="xs" c="dimmed" fw={500}>
          {open ? "▾" : "▸"} {streaming ? "Thinking…" : "Thinking"}{" "}
          <span data-testid="reasoning-length">· {words} {words === 1 ? "word" : "words"}, {text.length} characters</span>
        </Text>
      </UnstyledButton>
      {open && (
        <Text size="xs" c="dimmed" mt={4} style={{ whiteSpace: "pre-wrap", fontStyle: "italic" }} data-testid="reasoning-text">
          {text}
        </Text>
      )}
    </Box>
  );
}
