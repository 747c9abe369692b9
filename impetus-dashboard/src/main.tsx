import "@mantine/core/styles.css";
import "@mantine/charts/styles.css";
import { MantineProvider } from "@mantine/core";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";
import { RealtimeProvider } from "./lib/realtime";

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <MantineProvider defaultColorScheme="auto">
      <RealtimeProvider>
        <App />
      </RealtimeProvider>
    </MantineProvider>
  </StrictMode>,
);
