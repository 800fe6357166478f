// Every console call to the server goes through apiFetch: same origin, the API key (if any)
// in the Authorization header, never in a URL. The key lives in sessionStorage, so it is
// forgotten when the tab closes.

const KEY = "edgevlm.apiKey";

export class Unauthorized extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

let onUnauthorized = () => {};

export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
  if (response.status === 401) {
    onUnauthorized(await errorMessage(response));
    throw new Unauthorized("API key needed");
  }
  return response;
}

export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

export async function getJSON(path) {
  const response = await apiFetch(path);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// The trace id of a response, from the traceparent header the server echoes.
export function traceId(response) {
  const parent = response.headers.get("traceparent") || "";
  return parent.split("-")[1] || null;
}

// The request's span from the trace file (it lands there within the flush interval).
export async function spanOf(trace, tries = 12) {
  for (let i = 0; i < tries; i++) {
    const response = await apiFetch(`/api/requests/${trace}`);
    if (response.ok) return response.json();
    const body = await response.json().catch(() => ({}));
    if (body.error?.code === "traces_off") return null;
    await new Promise((r) => setTimeout(r, 500));
  }
  return null;
}
