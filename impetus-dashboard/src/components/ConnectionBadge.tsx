import { Badge, Tooltip } from "@mantine/core";
import { useRealtime, type ConnectionState } from "../lib/realtime";

const LOOK: Record<ConnectionState, { color: string; label: string; hint: string }> = {
  connecting: { color: "gray", label: "Connecting", hint: "Opening the live feed (Socket.IO)." },
  connected: { color: "teal", label: "Live", hint: "Receiving live metrics and events." },
  reconnecting: { color: "yellow", label: "Reconnecting", hint: "The live feed dropped; reconnecting automatically." },
  offline: { color: "red", label: "Offline", hint: "The server cannot be reached; retrying." },
  unauthorized: { color: "orange", label: "Key needed", hint: "The live feed needs a valid API key." },
};

export function ConnectionBadge() {
  const { state } = useRealtime();
  const look = LOOK[state];
  return (
    <Tooltip label={look.hint}>
      <Badge color={look.color} variant="dot" size="lg" data-testid="connection-state" data-state={state}>
        {look.label}
      </Badge>
    </Tooltip>
  );
}
