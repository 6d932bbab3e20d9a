// The free-form preview page: any policy document, validated and run by the filter's engine.

import { el, setUpHeader } from './common.js';
import { loadEngine } from './engine.js';
import { mountPreview } from './preview-panel.js';

setUpHeader();
const EXAMPLE = {
  schema: 1,
  version: 'example',
  settings: { trusted_proxies: ['10.0.0.0/8'] },
  sites: [{
    id: 'shop',
    hostnames: ['shop.example', 'www.shop.example'],
    https: 'force',
    canonical_host: 'www.shop.example',
    hsts: { enabled: true, max_age: 31536000 },
    mixed_content: 'upgrade',
    cert_ready: ['shop.example', 'www.shop.example'],
  }],
};
const textarea = document.getElementById('policy-json');
const problems = document.getElementById('problems');
textarea.value = JSON.stringify(EXAMPLE, null, 2);
const update = mountPreview(document.getElementById('preview-panel'), () => textarea.value,
  { host: 'shop.example' });

async function validate() {
  try {
    const engine = await loadEngine();
    problems.replaceChildren(...engine.validate(textarea.value)
      .map((p) => el('li', {}, `${p.path}: ${p.message}`)));
  } catch (error) {
    problems.replaceChildren(el('li', {}, error.message));
  }
}
textarea.addEventListener('input', () => { validate(); update(); });
validate();
update();
