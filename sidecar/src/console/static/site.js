// A site's page: names with their diagnosis, certificates, events, mixed-content findings, the
// policy editor (validated by the filter's engine as you type) and the live preview.

import { adminApi, api, el, setUpHeader, when } from './common.js';
import { loadEngine } from './engine.js';
import { mountPreview } from './preview-panel.js';

setUpHeader();
const name = new URLSearchParams(location.search).get('name') || '';
const siteUrl = `/sites/${encodeURIComponent(name)}`;
const $ = (id) => document.getElementById(id);
const inputs = {
  https: $('policy-https'),
  redirect: $('policy-redirect'),
  canonical: $('policy-canonical'),
  hsts: $('policy-hsts'),
  maxAge: $('policy-hsts-max-age'),
  subdomains: $('policy-hsts-subdomains'),
  preload: $('policy-hsts-preload'),
  mixed: $('policy-mixed'),
};
let documentFromServer = null;
let updatePreview = () => {};

function problem(message) {
  $('site-problem').hidden = !message;
  $('site-problem').textContent = message || '';
}

/** The policy as the form has it, in the admin API's PATCH shape. */
function editedPolicy() {
  return {
    https: inputs.https.value,
    redirect: inputs.redirect.value,
    canonical_host: inputs.canonical.value || null,
    hsts: {
      enabled: inputs.hsts.checked,
      max_age: Number(inputs.maxAge.value || 0),
      include_subdomains: inputs.subdomains.checked,
      preload: inputs.preload.checked,
    },
    mixed_content: inputs.mixed.value,
  };
}

/** The feed's document for this site, with the form's policy in place of the saved one. */
function editedDocument() {
  if (!documentFromServer) return '{}';
  const doc = structuredClone(documentFromServer);
  const policy = editedPolicy();
  Object.assign(doc.sites[0], {
    https: policy.https,
    redirect: policy.redirect,
    canonical_host: policy.canonical_host,
    hsts: policy.hsts,
    mixed_content: policy.mixed_content,
  });
  return JSON.stringify(doc);
}

async function validatePolicy() {
  try {
    const engine = await loadEngine();
    const found = engine.validate(editedDocument());
    $('problems').replaceChildren(...found.map((p) => el('li', {}, `${p.path.replace(/^sites\[0\]\./, '')}: ${p.message}`)));
    $('save-policy').disabled = found.length > 0;
  } catch (error) {
    $('problems').replaceChildren(el('li', {}, error.message));
  }
}

function showPolicy(site) {
  const policy = site.policy;
  inputs.canonical.replaceChildren(el('option', { value: '' }, 'none'),
    ...site.hostnames.filter((h) => !h.name.startsWith('*.'))
      .map((h) => el('option', { value: h.name }, h.name)));
  inputs.https.value = policy.https;
  inputs.redirect.value = policy.redirect;
  inputs.canonical.value = policy.canonical_host || '';
  inputs.hsts.checked = policy.hsts.enabled;
  inputs.maxAge.value = policy.hsts.max_age;
  inputs.subdomains.checked = policy.hsts.include_subdomains;
  inputs.preload.checked = policy.hsts.preload;
  inputs.mixed.value = policy.mixed_content;
}

async function showNames(site) {
  const rows = site.hostnames.map((h) => {
    const verdict = el('td', { class: 'verdict' }, '…');
    const fix = el('td', { class: 'muted' }, '');
    const remove = el('button', { type: 'button', 'data-name': h.name }, 'Remove');
    remove.disabled = h.kind === 'primary';
    remove.addEventListener('click', () => changeNames(() =>
      adminApi(`${siteUrl}/hostnames/${encodeURIComponent(h.name)}`, { method: 'DELETE' }), `${h.name} removed`));
    adminApi(`/diagnose/${encodeURIComponent(h.name)}`).then((d) => {
      verdict.textContent = d.verdict;
      verdict.className = `verdict verdict-${d.verdict}`;
      fix.textContent = d.fix;
    }, (error) => { verdict.textContent = 'unknown'; fix.textContent = error.message; });
    return el('tr', { 'data-name': h.name }, el('td', {}, h.name), el('td', {}, h.kind), verdict, fix, el('td', {}, remove));
  });
  $('names').tBodies[0].replaceChildren(...rows);
}

async function changeNames(call, done) {
  $('names-status').textContent = 'Saving…';
  try {
    await call();
    $('names-status').textContent = `${done}; a new certificate is ordered for the site's names.`;
    await load();
  } catch (error) {
    $('names-status').textContent = error.message;
  }
}

async function showCertificates() {
  const status = await adminApi(`${siteUrl}/certificates`);
  $('certificates').replaceChildren(...status.certificates.map((c) => el('li', { 'data-serial': c.serial },
    `${c.names.join(', ')}: expires ${when(c.not_after)} (serial ${c.serial})`)));
  if (!status.certificates.length) $('certificates').append(el('li', { class: 'muted' }, 'no certificate yet'));
  $('uncovered').textContent = status.uncovered.length
    ? `Not in any certificate: ${status.uncovered.join(', ')}` : 'Every name is covered.';
  return status;
}

async function showEvents() {
  const events = await adminApi(`${siteUrl}/events?limit=20`);
  $('events').tBodies[0].replaceChildren(...events.map((e) =>
    el('tr', {}, el('td', {}, when(e.at)), el('td', {}, e.kind), el('td', {}, e.message))));
}

async function showMixedContent() {
  const findings = await adminApi(`${siteUrl}/mixed-content`);
  $('mixed-content').tBodies[0].replaceChildren(...findings.map((f) => el('tr', {},
    el('td', {}, f.page), el('td', {}, f.resource), el('td', {}, f.directive), el('td', {}, f.reports), el('td', {}, when(f.last_seen)))));
  $('mixed-content-empty').textContent = findings.length ? ''
    : 'No http:// resources reported (reports are collected when mixed content is "report").';
}

async function load() {
  let site;
  try {
    site = await adminApi(siteUrl);
    documentFromServer = await api(`/console/api/sites/${encodeURIComponent(name)}/policy-document`);
  } catch (error) {
    problem(error.message);
    return;
  }
  problem(site.issuance.last_problem ? `Last problem: ${site.issuance.last_problem}` : '');
  document.title = `${site.name} · autohttps console`;
  $('site-name').textContent = `${site.name} (${site.primary})`;
  showPolicy(site);
  const target = $('preview-target');
  if (target && target.value === '/') target.value = `${site.primary}/`;
  await Promise.all([showNames(site), showCertificates(), showEvents(), showMixedContent()].map((p) => p.catch((e) => problem(e.message))));
  validatePolicy();
  updatePreview();
}

$('policy').addEventListener('input', () => { validatePolicy(); updatePreview(); });
$('policy').addEventListener('change', () => { validatePolicy(); updatePreview(); });
$('policy').addEventListener('submit', (event) => event.preventDefault());
$('save-policy').addEventListener('click', async () => {
  $('save-status').textContent = 'Saving…';
  try {
    await adminApi(siteUrl, { method: 'PATCH', body: editedPolicy() });
    $('save-status').textContent = 'Saved: the edge enforces it within about a second.';
    await load();
  } catch (error) {
    $('save-status').textContent = error.message;
  }
});
$('add-name').addEventListener('submit', (event) => {
  event.preventDefault();
  const hostname = $('new-name').value.trim();
  changeNames(() => adminApi(`${siteUrl}/hostnames`, { method: 'POST', body: { hostname } }), `${hostname} added`)
    .then(() => { $('new-name').value = ''; });
});
$('regenerate').addEventListener('click', async () => {
  const before = new Set((await showCertificates()).certificates.map((c) => c.serial));
  $('progress').textContent = 'Regeneration requested…';
  $('regenerate').disabled = true;
  try {
    await adminApi(`${siteUrl}/regenerate`, { method: 'POST' });
    for (let second = 0; second < 180; second += 1) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const status = await showCertificates();
      const fresh = status.certificates.find((c) => !before.has(c.serial));
      if (fresh) {
        $('progress').textContent = `Done: new certificate ${fresh.serial}, expires ${when(fresh.not_after)}.`;
        break;
      }
      if (status.issuance.failures > 0 && !status.working && !status.orders_in_flight.length && !status.issuance.regenerate_requested) {
        $('progress').textContent = `Failed: ${status.issuance.last_problem}`;
        break;
      }
      $('progress').textContent = status.orders_in_flight.length
        ? `Ordering from the CA (${status.orders_in_flight.length} order in flight, ${second + 1} s)…`
        : `${status.working ? 'Working' : 'Waiting for the issuer'} (${second + 1} s)…`;
    }
  } catch (error) {
    $('progress').textContent = error.message;
  } finally {
    $('regenerate').disabled = false;
    showEvents().catch(() => {});
  }
});

updatePreview = mountPreview($('preview-panel'), editedDocument, { host: '' });
load();
