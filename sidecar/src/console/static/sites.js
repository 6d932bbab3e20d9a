// The sites page: one server-side page of site summaries at a time, filtered and sorted by
// the server (GET /console/api/sites), so 10,000 sites never make one huge table.

import { api, el, setUpHeader, when } from './common.js';

setUpHeader();
const controls = {
  q: document.getElementById('q'),
  state: document.getElementById('state'),
  https: document.getElementById('https'),
  sort: document.getElementById('sort'),
};
const body = document.querySelector('#sites tbody');
const count = document.getElementById('count');
const pageLabel = document.getElementById('page-label');
const previous = document.getElementById('previous-page');
const next = document.getElementById('next-page');
let page = 0;
let loading = 0;

async function load() {
  const ticket = ++loading;
  const query = new URLSearchParams({ sort: controls.sort.value, page: String(page) });
  for (const key of ['q', 'state', 'https']) {
    if (controls[key].value) query.set(key, controls[key].value);
  }
  let listing;
  try {
    listing = await api(`/console/api/sites?${query}`);
  } catch (error) {
    count.textContent = error.message;
    return;
  }
  if (ticket !== loading) return;
  body.replaceChildren(...listing.sites.map((site) => el('tr', { 'data-site': site.name },
    el('td', {}, el('a', { href: `/console/site?name=${encodeURIComponent(site.name)}` }, site.name)),
    el('td', {}, site.primary),
    el('td', {}, site.hostnames),
    el('td', {}, site.https),
    el('td', { class: `state state-${site.state}` }, site.state),
    el('td', {}, when(site.soonest_expiry)),
    el('td', { class: 'muted' }, site.last_problem || ''))));
  const pages = Math.max(1, Math.ceil(listing.matching / listing.per_page));
  const byState = Object.entries(listing.states).map(([state, n]) => `${n} ${state}`).join(', ');
  count.textContent = `${listing.matching} of ${listing.total} sites${byState ? ` (${byState})` : ''}`;
  pageLabel.textContent = `page ${listing.page + 1} of ${pages}`;
  previous.disabled = listing.page === 0;
  next.disabled = listing.page + 1 >= pages;
}

let typing = null;
controls.q.addEventListener('input', () => {
  clearTimeout(typing);
  typing = setTimeout(() => { page = 0; load(); }, 200);
});
for (const key of ['state', 'https', 'sort']) {
  controls[key].addEventListener('change', () => { page = 0; load(); });
}
document.getElementById('filter').addEventListener('submit', (event) => event.preventDefault());
previous.addEventListener('click', () => { page = Math.max(0, page - 1); load(); });
next.addEventListener('click', () => { page += 1; load(); });
load();
