import type { FormFields } from "../params";

const NUMBERS: { key: keyof FormFields; label: string; step: string; hint: string }[] = [
  { key: "maxTokens", label: "Max tokens", step: "1", hint: "tokens to generate" },
  { key: "temperature", label: "Temperature", step: "0.1", hint: "0 = greedy" },
  { key: "topP", label: "Top-p", step: "0.05", hint: "nucleus mass, 1 = off" },
  { key: "topK", label: "Top-k", step: "1", hint: "-1 or 0 = off" },
  { key: "seed", label: "Seed", step: "1", hint: "empty = random" },
];

/** The generation parameters, shared by the completion and chat views. */
export function ParamFields({ fields, onChange }: { fields: FormFields; onChange: (f: FormFields) => void }) {
  const set = (key: keyof FormFields, value: string | boolean) => onChange({ ...fields, [key]: value });
  return (
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
  );
}
