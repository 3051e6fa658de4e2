// The form's fields as typed (strings, so a field can be empty while editing) and the request
// parameters they make. Only the form's own shape is checked here; the gateway judges the values
// (its 400 explains what is out of range), so the UI never disagrees with it.

import type { CompletionParams, SamplingParams } from "./client";

export interface FormFields {
  prompt: string;
  maxTokens: string;
  temperature: string;
  topP: string;
  topK: string;
  seed: string;
  stop: string; // one stop sequence per line
  ignoreEos: boolean;
}

export const DEFAULT_FIELDS: FormFields = {
  prompt: "The distributed pipeline",
  maxTokens: "64",
  temperature: "1",
  topP: "1",
  topK: "-1",
  seed: "",
  stop: "",
  ignoreEos: false,
};

function number(label: string, value: string, integer: boolean): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || (integer && !Number.isInteger(n))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"}, got "${value}"`);
  }
  return n;
}

export function toParams(f: FormFields): CompletionParams {
  if (f.prompt.trim() === "") throw new Error("Enter some input text first.");
  return { prompt: f.prompt, ...toSampling(f) };
}

/** The generation parameters alone (what the chat view sends with its messages). */
export function toSampling(f: FormFields): SamplingParams {
  const stop = f.stop.split("\n").filter((s) => s !== "");
  return {
    max_tokens: number("Max tokens", f.maxTokens, true),
    temperature: number("Temperature", f.temperature, false),
    top_p: number("Top-p", f.topP, false),
    top_k: number("Top-k", f.topK, true),
    ...(f.seed.trim() === "" ? {} : { seed: number("Seed", f.seed, true) }),
    ...(stop.length ? { stop } : {}),
    ...(f.ignoreEos ? { ignore_eos: true } : {}),
  };
}
