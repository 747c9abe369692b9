/// <reference types="vitest/config" />
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";
import { SERVER_PREFIXES } from "./src/api/endpoints";

// `pnpm dev` proxies the API to a server started with `make run` (IMPETUS_URL to point elsewhere).
const api = process.env.IMPETUS_URL ?? "http://127.0.0.1:8080";

export default defineConfig({
  plugins: [react()],
  base: "/",
  build: { outDir: "dist", chunkSizeWarningLimit: 1500, reportCompressedSize: false },
  server: {
    proxy: Object.fromEntries(
      SERVER_PREFIXES.map((p) => [p, api]),
    ),
  },
  test: {
    environment: "happy-dom",
    setupFiles: ["./src/test/setup.ts"],
    include: ["src/**/*.test.{ts,tsx}"],
  },
});
