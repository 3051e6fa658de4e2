import { type FormEvent, type KeyboardEvent, useEffect, useRef, useState } from "react";
import type { FormFields } from "../params";
import { ParamFields } from "./ParamFields";

export interface Turn {
  role: "user" | "assistant";
  content: string;
  state?: "streaming" | "done" | "stopped";
}

interface Props {
  turns: Turn[];
  system: string;
  fields: FormFields;
  running: boolean;
  onSystem: (text: string) => void;
  onFields: (fields: FormFields) => void;
  onSend: (message: string) => Promise<boolean>; // false: not sent (the draft comes back)
  onStop: () => void;
  onClear: () => void;
}

const WHO = { user: "You", assistant: "Model" };

/** A conversation with the model through /v1/chat/completions (its chat template): each answer
 * streams into the conversation. Enter sends, Shift+Enter starts a new line, Escape stops. */
export function ChatView({ turns, system, fields, running, onSystem, onFields, onSend, onStop, onClear }: Props) {
  const [draft, setDraft] = useState("");
  const end = useRef<HTMLLIElement | null>(null);
  const last = turns.at(-1)?.content;
  useEffect(() => {
    // no return value: newer browsers' scrollIntoView returns a promise, which React would take
    // for the effect's cleanup function
    void end.current?.scrollIntoView?.({ block: "nearest" });
  }, [turns.length, last]);

  const send = async () => {
    if (running) return;
    const message = draft;
    setDraft("");
    if (!(await onSend(message))) setDraft(message);
  };
  const submit = (e: FormEvent) => {
    e.preventDefault();
    void send();
  };
  const keys = (e: KeyboardEvent) => {
    if (e.key === "Enter" && !e.shiftKey && (e.target as HTMLElement).id === "message") {
      e.preventDefault();
      void send();
    } else if (e.key === "Escape" && running) {
      onStop();
    }
  };
  return (
    <form className="panel chat" onSubmit={submit} onKeyDown={keys} aria-label="Chat">
      <label htmlFor="system">System message</label>
      <textarea
        id="system"
        rows={2}
        value={system}
        onChange={(e) => onSystem(e.target.value)}
        aria-describedby="system-hint"
      />
      <p id="system-hint" className="hint">
        Optional; sent first with every turn. The model's chat template turns the conversation into its prompt.
      </p>
      <ol className="conversation" aria-label="Conversation" data-testid="conversation" aria-live="polite">
        {turns.map((t, i) => (
          <li key={i} className={`turn ${t.role}`} data-testid={`turn-${i}`} ref={i === turns.length - 1 ? end : undefined}>
            <span className="who">{WHO[t.role]}</span>
            <div className="content" data-testid={t.role === "assistant" ? "answer" : undefined}>
              {t.content}
              {t.state === "streaming" && <span className="cursor" aria-hidden="true" />}
            </div>
            {t.state === "stopped" && <span className="hint">stopped</span>}
          </li>
        ))}
      </ol>
      {turns.length === 0 && <p className="hint">The conversation starts with your first message.</p>}
      <label htmlFor="message">Message</label>
      <textarea
        id="message"
        rows={3}
        value={draft}
        onChange={(e) => setDraft(e.target.value)}
        aria-describedby="message-hint"
      />
      <p id="message-hint" className="hint">
        Enter sends it, Shift+Enter starts a new line, Escape stops the answer.
      </p>
      <ParamFields fields={fields} onChange={onFields} />
      <div className="actions">
        <button type="submit" disabled={running}>
          Send
        </button>
        <button type="button" className="secondary" disabled={!running} onClick={onStop}>
          Stop
        </button>
        <button type="button" className="secondary" disabled={running || turns.length === 0} onClick={onClear}>
          New conversation
        </button>
      </div>
    </form>
  );
}
