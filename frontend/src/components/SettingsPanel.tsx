import { useState } from "react";
import type { Settings } from "../settings";

/** The gateway and Jaeger URLs (saved in this browser). */
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
