// The filter's policy engine in the browser: the module `wasm-bindgen --target web` built from
// filter/web (Rust), loaded once. Nothing here decides anything itself.

const GLUE = '/console/static/autohttps_policy_web.js';
let engine = null;

/** `{ preview(policyJson, request) -> result, validate(policyJson) -> problems }`. */
export function loadEngine() {
  if (engine === null) {
    engine = (async () => {
      let glue;
      try {
        glue = await import(GLUE);
        await glue.default();
      } catch (error) {
        const response = await fetch(GLUE).catch(() => null);
        const why = response && !response.ok ? await response.text() : String(error);
        throw new Error(`The policy preview cannot run: ${why}`);
      }
      return {
        preview: (policyJson, request) => JSON.parse(glue.preview(policyJson, JSON.stringify(request))),
        validate: (policyJson) => JSON.parse(glue.validate(policyJson)),
      };
    })();
  }
  return engine;
}
