import type { FormEvent, KeyboardEvent } from "react";
import type { FormFields } from "../params";

interface Props {
  fields: FormFields;
  running: boolean;
  onChange: (fields: FormFields) => void;
  onSubmit: () => void;
  onStop: () => void;
}

const NUMBERS: { key: keyof FormFields; label: string; step: string; hint: string }[] = [
  { key: "maxTokens", label: "Max tokens", step: "1", hint: "tokens to generate" },
  { key: "temperature", label: "Temperature", step: "0.1", hint: "0 = greedy" },
  { key: "topP", label: "Top-p", step: "0.05", hint: "nucleus mass, 1 = off" },
  { key: "topK", label: "Top-k", step: "1", hint: "-1 or 0 = off" },
  { key: "seed", label: "Seed", step: "1", hint: "empty = random" },
];

/** The input text, the generation parameters, Process Input and Stop. Ctrl+Enter (or ⌘+Enter) in
 * the text runs it; Escape stops a running generation. */
export function ParamsForm({ fields, running, onChange, onSubmit, onStop }: Props) {
  const set = (key: keyof FormFields, value: string | boolean) => onChange({ ...fields, [key]: value });
  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (!running) onSubmit();
  };
  const keys = (e: KeyboardEvent) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !running) {
      e.preventDefault();
      onSubmit();
    } else if (e.key === "Escape" && running) {
      onStop();
    }
  };
  return (
    <form className="panel params" onSubmit={submit} onKeyDown={keys} aria-label="Generation request">
      <label htmlFor="prompt">Input text</label>
      <textarea
        id="prompt"
        value={fields.prompt}
        rows={4}
        onChange={(e) => set("prompt", e.target.value)}
        aria-describedby="prompt-hint"
      />
      <p id="prompt-hint" className="hint">
        Ctrl+Enter runs it, Escape stops it.
      </p>
      <fieldset>
        <legend>Generation parameters</legend>
        <div className="grid">
          {NUMBERS.map(({ key, label, step, hint }) => (
            <div className="field" key={key}>
              <label htmlFor={key}>{label}</label>
              <input
                id={key}
                type="number"
                inputMode="decimal"
                step={step}
                value={fields[key] as string}
                onChange={(e) => set(key, e.target.value)}
                aria-describedby={`${key}-hint`}
              />
              <span id={`${key}-hint`} className="hint">
                {hint}
              </span>
            </div>
          ))}
          <div className="field">
            <label htmlFor="stop">Stop sequences</label>
            <textarea
              id="stop"
              rows={2}
              value={fields.stop}
              onChange={(e) => set("stop", e.target.value)}
              aria-describedby="stop-hint"
            />
            <span id="stop-hint" className="hint">
              one per line, up to 4
            </span>
          </div>
          <div className="field check">
            <input
              id="ignoreEos"
              type="checkbox"
              checked={fields.ignoreEos}
              onChange={(e) => set("ignoreEos", e.target.checked)}
            />
            <label htmlFor="ignoreEos">Ignore end of text (generate exactly max tokens)</label>
          </div>
        </div>
      </fieldset>
      <div className="actions">
        <button type="submit" disabled={running}>
          Process Input
        </button>
        <button type="button" className="secondary" disabled={!running} onClick={onStop}>
          Stop
        </button>
      </div>
    </form>
  );
}
