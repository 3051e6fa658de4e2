// What the UI says when a request fails: one error type, one mapping from the gateway's answers
// (OpenAI's error body on /v1/, RFC 9457 problem details elsewhere) to a message a person can act on.

export type ErrorKind = "unreachable" | "refused" | "busy" | "server" | "stream";

export class GatewayError extends Error {
  constructor(
    message: string,
    readonly kind: ErrorKind,
    readonly status?: number,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = "GatewayError";
  }
}

/** The reason inside an error body: OpenAI's `error.message` (with `param`), a problem's
 * `detail`, or the text itself. */
export function reasonOf(body: string): string {
  try {
    const doc = JSON.parse(body) as {
      error?: { message?: string; param?: string | null };
      detail?: string;
      title?: string;
    };
    if (doc.error?.message) {
      return doc.error.param ? `${doc.error.message} (parameter: ${doc.error.param})` : doc.error.message;
    }
    if (doc.detail) return doc.detail;
    if (doc.title) return doc.title;
  } catch {
    // not JSON: the text as it is
  }
  return body.trim().slice(0, 300) || "no reason given";
}

/** Retry-After in seconds: a number of seconds or an HTTP date (undefined if absent or unreadable). */
export function retryAfterSeconds(value: string | null, now: number = Date.now()): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, Math.ceil((at - now) / 1000));
}

export function errorFromResponse(status: number, body: string, headers: Headers): GatewayError {
  const reason = reasonOf(body);
  if (status === 429) {
    const wait = retryAfterSeconds(headers.get("Retry-After"));
    const when = wait === undefined ? "shortly" : `in ${wait} s`;
    return new GatewayError(`The gateway is busy (${reason}). Try again ${when}.`, "busy", status, wait);
  }
  if (status >= 400 && status < 500) {
    return new GatewayError(`The gateway refused the request (${status}): ${reason}`, "refused", status);
  }
  return new GatewayError(`The gateway failed (${status}): ${reason}`, "server", status);
}

export function unreachable(gatewayUrl: string, cause: unknown): GatewayError {
  const where = gatewayUrl || window.location.origin;
  const why = cause instanceof Error && cause.message ? ` (${cause.message})` : "";
  return new GatewayError(
    `Cannot reach the gateway at ${where}${why}. Is the stack running (make up), ` +
      "and is the gateway URL in Settings right?",
    "unreachable",
  );
}
