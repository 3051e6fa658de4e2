import { useState } from "react";
import type { Settings } from "../settings";

/** The gateway and Jaeger URLs (saved in this browser) and the gateway's API key (kept for this tab
 * only: sessionStorage). */
export function SettingsPanel({ settings, onSave }: { settings: Settings; onSave: (s: Settings) => void }) {
  const [draft, setDraft] = useState(settings);
  return (
    <details className="panel settings">
      <summary>Settings</summary>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          onSave(draft);
        }}
      >
        <label htmlFor="gatewayUrl">Gateway URL</label>
        <input
          id="gatewayUrl"
          type="url"
          value={draft.gatewayUrl}
          placeholder="(this page's origin)"
          onChange={(e) => setDraft({ ...draft, gatewayUrl: e.target.value })}
        />
        <label htmlFor="apiKey">API key</label>
        <input
          id="apiKey"
          type="password"
          autoComplete="off"
          value={draft.apiKey}
          placeholder="(none)"
          aria-describedby="apiKey-hint"
          onChange={(e) => setDraft({ ...draft, apiKey: e.target.value })}
        />
        <p id="apiKey-hint" className="hint">
          When the gateway runs with TANDEM_API_KEYS; sent as a bearer token, kept for this tab only.
        </p>
        <label htmlFor="jaegerUrl">Jaeger URL</label>
        <input
          id="jaegerUrl"
          type="url"
          value={draft.jaegerUrl}
          onChange={(e) => setDraft({ ...draft, jaegerUrl: e.target.value })}
        />
        <button type="submit">Save settings</button>
      </form>
    </details>
  );
}
