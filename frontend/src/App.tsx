import { type KeyboardEvent, useCallback, useState } from "react";
import { type ChatMessage, streamChat, streamCompletion } from "./client";
import { ChatView, type Turn } from "./components/ChatView";
import { MetricsPanel } from "./components/MetricsPanel";
import { NodesPanel } from "./components/NodesPanel";
import { ParamsForm } from "./components/ParamsForm";
import { SettingsPanel } from "./components/SettingsPanel";
import { statusLine, useGeneration } from "./generation";
import { subtitle, useNodes } from "./nodes";
import { DEFAULT_FIELDS, type FormFields, toParams, toSampling } from "./params";
import { type Settings, loadSettings, saveSettings } from "./settings";

type View = "completion" | "chat";
const VIEWS: { id: View; label: string }[] = [
  { id: "completion", label: "Completion" },
  { id: "chat", label: "Chat" },
];

function replaceLast(turns: Turn[], change: Partial<Turn>): Turn[] {
  return turns.map((t, i) => (i === turns.length - 1 ? { ...t, ...change } : t));
}

export function App({ nodesIntervalMs = 2000 }: { nodesIntervalMs?: number }) {
  const [settings, setSettings] = useState<Settings>(() => loadSettings());
  const [fields, setFields] = useState<FormFields>(DEFAULT_FIELDS);
  const [view, setView] = useState<View>("completion");
  const [output, setOutput] = useState("");
  const [turns, setTurns] = useState<Turn[]>([]);
  const [system, setSystem] = useState("");
  const nodes = useNodes(settings.gatewayUrl, nodesIntervalMs, fetch, settings.apiKey);
  const gen = useGeneration(nodes.refresh);
  const { gatewayUrl, apiKey } = settings;

  const runCompletion = useCallback(async () => {
    let params;
    try {
      params = toParams(fields);
    } catch (e) {
      gen.fail((e as Error).message);
      return;
    }
    setOutput("");
    await gen.run((h) => streamCompletion(gatewayUrl, params, { ...h, apiKey }), setOutput);
  }, [fields, gatewayUrl, apiKey, gen]);

  const sendChat = useCallback(
    async (message: string) => {
      let params;
      try {
        if (message.trim() === "") throw new Error("Type a message first.");
        params = toSampling(fields);
      } catch (e) {
        gen.fail((e as Error).message);
        return false;
      }
      const history: ChatMessage[] = turns.map(({ role, content }) => ({ role, content }));
      const messages: ChatMessage[] = [
        ...(system.trim() ? [{ role: "system" as const, content: system }] : []),
        ...history,
        { role: "user", content: message },
      ];
      setTurns([...turns, { role: "user", content: message }, { role: "assistant", content: "", state: "streaming" }]);
      const res = await gen.run(
        (h) => streamChat(gatewayUrl, messages, params, { ...h, apiKey }),
        (text) => setTurns((ts) => replaceLast(ts, { content: text })),
      );
      if (res === null) setTurns(turns); // refused or failed: the turn is taken back, the draft restored
      else setTurns((ts) => replaceLast(ts, { state: res.aborted ? "stopped" : "done" }));
      return res !== null;
    },
    [fields, turns, system, gatewayUrl, apiKey, gen],
  );

  const save = (s: Settings) => {
    saveSettings(s);
    setSettings(s);
  };
  const running = gen.phase === "running";
  // one tab stop for the tab list; the arrow keys move between the views (WAI-ARIA tabs)
  const arrows = (e: KeyboardEvent) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (step === undefined || running) return;
    const next = VIEWS[(VIEWS.findIndex((v) => v.id === view) + step + VIEWS.length) % VIEWS.length];
    setView(next.id);
    document.getElementById(`tab-${next.id}`)?.focus();
  };

  return (
    <>
      <header>
        <h1>tandem</h1>
        <p data-testid="subtitle">{subtitle(nodes.status)}</p>
      </header>
      <main>
        <section className="left" aria-label="Request">
          <div className="tabs" role="tablist" aria-label="View" onKeyDown={arrows}>
            {VIEWS.map((v) => (
              <button
                key={v.id}
                type="button"
                role="tab"
                id={`tab-${v.id}`}
                aria-selected={view === v.id}
                aria-controls="view"
                tabIndex={view === v.id ? 0 : -1}
                className={view === v.id ? "tab selected" : "tab"}
                disabled={running && view !== v.id}
                onClick={() => setView(v.id)}
              >
                {v.label}
              </button>
            ))}
          </div>
          <div id="view" role="tabpanel" aria-labelledby={`tab-${view}`}>
            {view === "completion" ? (
              <ParamsForm fields={fields} running={running} onChange={setFields} onSubmit={runCompletion} onStop={gen.stop} />
            ) : (
              <ChatView
                turns={turns}
                system={system}
                fields={fields}
                running={running}
                onSystem={setSystem}
                onFields={setFields}
                onSend={sendChat}
                onStop={gen.stop}
                onClear={() => setTurns([])}
              />
            )}
          </div>
          {gen.error && (
            <div className="error" role="alert" data-testid="error">
              {gen.error}
            </div>
          )}
          <p className="status" role="status" data-testid="status">
            {statusLine(gen.phase, gen.result, gen.metrics?.generatedTokens ?? 0)}
          </p>
          {view === "completion" && (
            <>
              <h2 id="output-h">Output</h2>
              <pre className="output" aria-labelledby="output-h" data-testid="output" tabIndex={0}>
                {output}
              </pre>
            </>
          )}
        </section>
        <section className="right">
          <div className="panel">
            <h2>Metrics</h2>
            <MetricsPanel
              metrics={gen.metrics}
              stageMs={gen.result?.stageMs ?? null}
              traceId={gen.traceId}
              tracing={nodes.status?.tracing ?? null}
              jaegerUrl={settings.jaegerUrl}
              finished={!running}
            />
          </div>
          <div className="panel">
            <h2>Node health</h2>
            <NodesPanel state={nodes} />
          </div>
          <SettingsPanel settings={settings} onSave={save} />
        </section>
      </main>
    </>
  );
}
