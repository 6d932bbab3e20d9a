// The preview form: a request (scheme, host and path, method, optionally a proxy's
// X-Forwarded-Proto and the upstream's own headers) and what the edge answers to it under the
// policy being edited, recomputed on every change by the filter's engine (engine.js).

import { el } from './common.js';
import { loadEngine } from './engine.js';

function field(label, input) {
  return [el('label', { for: input.id }, label), input];
}

/**
 * Mounts the preview into `container`. `policyJson()` gives the policy document to run (a
 * string). Returns `update()`, to call when the policy changes.
 */
export function mountPreview(container, policyJson, { host = 'example.com', scheme = 'http' } = {}) {
  const schemeSelect = el('select', { id: 'preview-scheme' },
    el('option', { value: 'http' }, 'HTTP'), el('option', { value: 'https' }, 'HTTPS'));
  schemeSelect.value = scheme;
  const target = el('input', { id: 'preview-target', type: 'text', value: `${host}/`, spellcheck: 'false' });
  const method = el('select', { id: 'preview-method' },
    ...['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'].map((m) => el('option', { value: m }, m)));
  const peer = el('input', { id: 'preview-peer', type: 'text', placeholder: 'e.g. 10.0.0.5 (a trusted proxy)', spellcheck: 'false' });
  const forwarded = el('select', { id: 'preview-forwarded-proto' },
    el('option', { value: '' }, 'none'), el('option', { value: 'https' }, 'https'), el('option', { value: 'http' }, 'http'));
  const upstreamHsts = el('input', { id: 'preview-upstream-hsts', type: 'text', placeholder: 'none', spellcheck: 'false' });
  const upstreamCsp = el('input', { id: 'preview-upstream-csp', type: 'text', placeholder: 'none', spellcheck: 'false' });
  const form = el('form', { class: 'preview-form', id: 'preview-form' },
    field('Connection', schemeSelect),
    field('Host and path', target),
    field('Method', method),
    field('Peer address', peer),
    field('X-Forwarded-Proto', forwarded),
    field('Upstream HSTS', upstreamHsts),
    field('Upstream CSP', upstreamCsp));
  form.addEventListener('submit', (event) => event.preventDefault());

  const out = {};
  const result = el('dl', { class: 'result', id: 'preview-result' });
  for (const [key, label] of [['status', 'Status'], ['location', 'Location'], ['hsts', 'Strict-Transport-Security'],
    ['csp', 'Content-Security-Policy'], ['csp-report-only', 'CSP-Report-Only']]) {
    out[key] = el('dd', { id: `preview-${key}` }, '–');
    result.append(el('dt', {}, label), out[key]);
  }
  const explanation = el('ol', { id: 'preview-explanation', class: 'muted' });
  const problem = el('p', { id: 'preview-problem', class: 'problem' });
  container.replaceChildren(form, problem, result, el('h3', {}, 'Why'), explanation);

  const show = (key, values) => {
    out[key].textContent = values && values.length ? [].concat(values).join('\n') : '–';
  };
  async function update() {
    let engine;
    try {
      engine = await loadEngine();
    } catch (error) {
      problem.textContent = error.message;
      return;
    }
    const request = {
      url: `${schemeSelect.value}://${target.value.trim().replace(/^[a-z]+:\/\//i, '')}`,
      method: method.value,
      peer: peer.value.trim() || null,
      forwarded_proto: forwarded.value || null,
      upstream_hsts: upstreamHsts.value.trim() || null,
      upstream_csp: upstreamCsp.value.trim() || null,
    };
    const answer = engine.preview(policyJson(), request);
    if (answer.problems) {
      problem.textContent = 'The policy is not valid: fix the problems listed with it.';
    } else if (answer.error) {
      problem.textContent = answer.error;
    } else {
      problem.textContent = '';
    }
    const ok = !answer.problems && !answer.error;
    out.status.textContent = !ok ? '–' : answer.status === null ? 'passed to the upstream (its own status)' : String(answer.status);
    show('location', ok ? answer.location : null);
    show('hsts', ok ? answer.hsts : null);
    show('csp', ok ? answer.csp : null);
    show('csp-report-only', ok ? answer.csp_report_only : null);
    explanation.replaceChildren(...(ok ? answer.explanation : []).map((reason) => el('li', {}, reason)));
    container.dataset.outcome = ok ? answer.outcome : 'invalid';
  }
  form.addEventListener('input', update);
  form.addEventListener('change', update);
  return update;
}
