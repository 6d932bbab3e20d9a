// autohttps console: what every page shares. The console's API calls carry the session
// cookie (HttpOnly, set at sign-in) and, when they change something, the session's CSRF token.

let csrfToken = null;

/** An admin API refusal, with its status and words. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function csrf() {
  if (csrfToken === null) {
    const response = await fetch('/console/api/session', { credentials: 'same-origin' });
    if (response.status === 401) {
      location.assign('/console');
      throw new ApiError(401, 'not signed in');
    }
    csrfToken = (await response.json()).csrf_token;
  }
  return csrfToken;
}

/** Calls the console API (`/console/api/...`); answers the JSON body, throws ApiError. */
export async function api(path, { method = 'GET', body } = {}) {
  const headers = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (method !== 'GET' && method !== 'HEAD') headers['x-csrf-token'] = await csrf();
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  });
  if (response.status === 401) location.assign('/console');
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text };
  }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || `HTTP ${response.status}`);
  }
  return data;
}

/** `/console/api/v1/...`: the admin API, relayed by the console with the token it holds. */
export function adminApi(path, options) {
  return api(`/console/api/v1${path}`, options);
}

/** Creates an element; children are nodes or text (always inserted as text, never as HTML). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A date as `2026-12-02 10:15 UTC`, or a dash. */
export function when(timestamp) {
  if (!timestamp) return '–';
  return timestamp.replace('T', ' ').replace(/:\d\d(\.\d+)?Z$/, ' UTC');
}

/** Wires the page header (sign-out). */
export function setUpHeader() {
  const button = document.getElementById('sign-out');
  if (button) {
    button.addEventListener('click', async () => {
      try {
        await api('/console/api/sign-out', { method: 'POST' });
      } finally {
        location.assign('/console');
      }
    });
  }
}
