// REST calls to the server: the API key (when one is set) as a Bearer header, errors from the
// OpenAI envelope, and one shared prompt for the key when any call is refused with 401.

const KEY_STORAGE = "impetus.apiKey";

export class ApiError extends Error {
  status: number;
  code: string | null;

  constructor(status: number, message: string, code: string | null = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getApiKey(): string | null {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null; // storage disabled: run without a stored key
  }
}

type Listener = () => void;
const keyListeners = new Set<Listener>();
const authListeners = new Set<(reason: string) => void>();

/** Keep the key for this browser session (sessionStorage), and tell subscribers to retry. */
export function setApiKey(key: string | null): void {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
  keyListeners.forEach((fn) => fn());
}

export function onKeyChange(fn: Listener): () => void {
  keyListeners.add(fn);
  return () => keyListeners.delete(fn);
}

/** Called with a reason whenever the server refuses a call for want of a (valid) key. */
export function onAuthRequired(fn: (reason: string) => void): () => void {
  authListeners.add(fn);
  return () => authListeners.delete(fn);
}

export function authRequired(reason: string): void {
  authListeners.forEach((fn) => fn(reason));
}

export function authHeaders(): Record<string, string> {
  const key = getApiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The error envelope the server answers with (OpenAI's shape); anything else keeps the status line. */
export interface ErrorBody {
  error?: { message?: string | null; code?: string | null } | null;
}

async function errorOf(response: Response): Promise<ApiError> {
  let message = `${response.status} ${response.statusText}`.trim();
  let code: string | null = null;
  try {
    const body = (await response.json()) as ErrorBody | null;
    if (body?.error?.message) message = body.error.message;
    code = body?.error?.code ?? null;
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, message, code);
}

// The key the server last refused. Polling on with it would spend this address's failed-login
// budget (IMPETUS_AUTH_FAIL_LIMIT) until the server locks the address out, the right key included:
// calls with a refused key stop here until the user enters another.
let refusedKey: string | null = null;

/** fetch with the key; a 401 asks for the key (once, through the shared prompt) and throws. */
export async function apiFetch(path: string, init: RequestInit = {}): Promise<Response> {
  const key = getApiKey();
  if (key !== null && key === refusedKey) {
    throw new ApiError(401, "The key was refused; enter another.", "invalid_api_key");
  }
  const headers = new Headers(init.headers);
  for (const [name, value] of Object.entries(authHeaders())) headers.set(name, value);
  if (init.body && !headers.has("Content-Type")) headers.set("Content-Type", "application/json");
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) {
    const error = await errorOf(response);
    if (key !== null) refusedKey = key;
    authRequired(key ? `The key was refused: ${error.message}` : "This server needs an API key.");
    throw error;
  }
  return response;
}

export async function apiJson<T>(path: string, init: RequestInit = {}): Promise<T> {
  const response = await apiFetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return (await response.json()) as T;
}

export function postJson<T>(path: string, body: unknown, method = "POST"): Promise<T> {
  return apiJson<T>(path, { method, body: JSON.stringify(body) });
}

/** Whether an optional endpoint exists on this server (others may not have landed): 404/405 say no. */
export async function endpointExists(path: string): Promise<boolean> {
  try {
    const response = await apiFetch(path, { method: "GET" });
    return response.status !== 404 && response.status !== 405;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return true;
    return false;
  }
}
