import { AppShell, Button, Burger, Group, NavLink, Text, Title, Tooltip } from "@mantine/core";
import { useDisclosure } from "@mantine/hooks";
import { useState, type ReactNode } from "react";
import { ApiKeyPrompt } from "./components/ApiKeyPrompt";
import { ConnectionBadge } from "./components/ConnectionBadge";
import { usePath } from "./lib/route";
import { Models } from "./pages/Models";
import { Overview } from "./pages/Overview";
import { Playground } from "./pages/Playground";
import { Requests } from "./pages/Requests";
import { Server } from "./pages/Server";

export const PAGES: { path: string; label: string; hint: string; render: () => ReactNode }[] = [
  { path: "/", label: "Overview", hint: "live throughput, latency, load", render: () => <Overview /> },
  { path: "/models", label: "Models", hint: "load, unload, pull, discover", render: () => <Models /> },
  { path: "/playground", label: "Playground", hint: "chat, streamed", render: () => <Playground /> },
  { path: "/requests", label: "Requests", hint: "recent requests", render: () => <Requests /> },
  { path: "/server", label: "Server", hint: "version, configuration, docs", render: () => <Server /> },
];

export function App() {
  const [path, navigate] = usePath();
  const [opened, { toggle, close }] = useDisclosure();
  const [askKey, setAskKey] = useState(0);
  const page = PAGES.find((p) => p.path === path) ?? PAGES[0];

  return (
    <AppShell header={{ height: 56 }} navbar={{ width: 220, breakpoint: "sm", collapsed: { mobile: !opened } }} padding="md">
      <AppShell.Header>
        <Group h="100%" px="md" justify="space-between">
          <Group gap="sm">
            <Burger opened={opened} onClick={toggle} hiddenFrom="sm" size="sm" />
            <Title order={3}>Impetus</Title>
            <Text size="sm" c="dimmed" visibleFrom="sm">
              {page.label}
            </Text>
          </Group>
          <Group gap="sm">
            <ConnectionBadge />
            <Tooltip label="Enter or replace the API key for this browser session">
              <Button variant="subtle" size="xs" onClick={() => setAskKey((n) => n + 1)} data-testid="api-key-button">
                API key
              </Button>
            </Tooltip>
          </Group>
        </Group>
      </AppShell.Header>
      <AppShell.Navbar p="xs">
        {PAGES.map((p) => (
          <NavLink
            key={p.path}
            href={p.path}
            label={p.label}
            description={p.hint}
            active={p.path === page.path}
            data-testid={`nav-${p.label.toLowerCase()}`}
            onClick={(e) => {
              e.preventDefault();
              navigate(p.path);
              close();
            }}
          />
        ))}
      </AppShell.Navbar>
      <AppShell.Main data-testid={`page-${page.label.toLowerCase()}`}>{page.render()}</AppShell.Main>
      <ApiKeyPrompt openSignal={askKey} />
    </AppShell>
  );
}
