// Vite: the build (everything bundled into dist/, no CDN), the dev server on :5173 that proxies the
// gateway's routes (TANDEM_GATEWAY_URL, default http://127.0.0.1:8000), and Vitest's settings.
import react from "@vitejs/plugin-react";
import { defineConfig } from "vitest/config";

const gateway = process.env.TANDEM_GATEWAY_URL || "http://127.0.0.1:8000";

export default defineConfig({
  plugins: [react()],
  server: {
    host: "127.0.0.1",
    port: 5173,
    strictPort: true,
    proxy: { "/v1": gateway, "/api": gateway },
  },
  build: { outDir: "dist", assetsInlineLimit: 0, sourcemap: false },
  test: {
    environment: "jsdom",
    include: ["src/**/*.test.{ts,tsx}"],
    restoreMocks: true,
  },
});
