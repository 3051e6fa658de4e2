import type { FormEvent, KeyboardEvent } from "react";
import type { FormFields } from "../params";
import { ParamFields } from "./ParamFields";

interface Props {
  fields: FormFields;
  running: boolean;
  onChange: (fields: FormFields) => void;
  onSubmit: () => void;
  onStop: () => void;
}

/** The input text, the generation parameters, Process Input and Stop. Ctrl+Enter (or ⌘+Enter) in
 * the text runs it; Escape stops a running generation. */
export function ParamsForm({ fields, running, onChange, onSubmit, onStop }: Props) {
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
        onChange={(e) => onChange({ ...fields, prompt: e.target.value })}
        aria-describedby="prompt-hint"
      />
      <p id="prompt-hint" className="hint">
        Ctrl+Enter runs it, Escape stops it.
      </p>
      <ParamFields fields={fields} onChange={onChange} />
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
