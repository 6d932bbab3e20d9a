//! The console's files, embedded in the binary: its pages, style, scripts and (when `make build`
//! has built it) the policy engine's browser module from `filter/web`.

/// The sign-in page; `<!--problem-->` is replaced by a refusal's words, or nothing.
pub const SIGN_IN_HTML: &str = include_str!("static/sign-in.html");
/// The sites page.
pub const SITES_HTML: &str = include_str!("static/sites.html");
/// A site's page.
pub const SITE_HTML: &str = include_str!("static/site.html");
/// The free-form preview page.
pub const PREVIEW_HTML: &str = include_str!("static/preview.html");

/// What the console says when this binary was built without the browser module.
pub const MODULE_MISSING: &str = "the policy preview module is not in this build of autohttps: run `make build` (it builds filter/web with wasm-bindgen into target/console-web/), then rebuild the sidecar";

const JS: &str = "text/javascript; charset=utf-8";

/// The files under `/console/static/`: (bytes, content type).
const FILES: &[(&str, &[u8], &str)] = &[
    (
        "console.css",
        include_bytes!("static/console.css"),
        "text/css; charset=utf-8",
    ),
    ("common.js", include_bytes!("static/common.js"), JS),
    ("engine.js", include_bytes!("static/engine.js"), JS),
    (
        "preview-panel.js",
        include_bytes!("static/preview-panel.js"),
        JS,
    ),
    ("sites.js", include_bytes!("static/sites.js"), JS),
    ("site.js", include_bytes!("static/site.js"), JS),
    ("preview.js", include_bytes!("static/preview.js"), JS),
];

/// The browser module `wasm-bindgen --target web` wrote (see `build.rs`).
#[cfg(console_preview_module)]
const MODULE: &[(&str, &[u8], &str)] = &[
    (
        "autohttps_policy_web.js",
        include_bytes!(concat!(
            env!("AUTOHTTPS_CONSOLE_WEB_DIR"),
            "/autohttps_policy_web.js"
        )),
        JS,
    ),
    (
        "autohttps_policy_web_bg.wasm",
        include_bytes!(concat!(
            env!("AUTOHTTPS_CONSOLE_WEB_DIR"),
            "/autohttps_policy_web_bg.wasm"
        )),
        "application/wasm",
    ),
];
#[cfg(not(console_preview_module))]
const MODULE: &[(&str, &[u8], &str)] = &[];

/// A console file by name.
pub fn file(name: &str) -> Option<(&'static [u8], &'static str)> {
    FILES
        .iter()
        .chain(MODULE)
        .find(|(file, _, _)| *file == name)
        .map(|(_, bytes, content_type)| (*bytes, *content_type))
}

/// Whether `name` is one of the browser module's files (missing from this build if
/// [`file`] does not find it).
pub fn is_preview_module(name: &str) -> bool {
    name.starts_with("autohttps_policy_web")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_load_only_their_own_files_with_no_inline_script_or_style() {
        for (name, page) in [
            ("sign-in", SIGN_IN_HTML),
            ("sites", SITES_HTML),
            ("site", SITE_HTML),
            ("preview", PREVIEW_HTML),
        ] {
            assert!(!page.contains("<style"), "{name} has inline style");
            assert!(!page.contains(" style="), "{name} has a style attribute");
            let handler = page.split(" on").skip(1).any(|rest| {
                let word: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
                !word.is_empty() && rest[word.len()..].starts_with('=')
            });
            assert!(!handler, "{name} has an inline event handler");
            for script in page.split("<script").skip(1) {
                assert!(
                    script.contains("src=\"/console/static/"),
                    "{name} has an inline or foreign script"
                );
            }
            for attribute in ["src=\"http", "href=\"http", "action=\"http"] {
                assert!(!page.contains(attribute), "{name} loads from elsewhere");
            }
        }
    }

    #[test]
    fn every_page_script_is_served() {
        for page in [SIGN_IN_HTML, SITES_HTML, SITE_HTML, PREVIEW_HTML] {
            for reference in page.split("/console/static/").skip(1) {
                let name = reference.split('"').next().unwrap_or_default();
                assert!(
                    file(name).is_some(),
                    "{name} is referenced but not embedded"
                );
            }
        }
    }
}
