//! The proxy-wasm glue: reads what Envoy knows about a request, asks [`crate::policy`], and
//! applies the decision; keeps the policy fresh from the sidecar's feed.
//!
//! Every host call goes through [`proxy_wasm::hostcalls`] and its `Result` is handled: a host
//! that refuses a call is logged, never a panic (which would abort the VM).

mod feed;
mod metrics;
mod stream;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::policy::{CompiledPluginConfig, Policy};

use feed::Feed;
use metrics::Metrics;
use stream::Stream;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Logs through the host; a refused log call has nowhere else to go.
pub(crate) fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// The policy the HTTP contexts read: replaced as a whole by a snapshot, updated in place by a
/// delta (a stream that needs its site after the request keeps that site, not the policy).
pub(crate) type SharedPolicy = Rc<RefCell<Policy>>;

/// The plugin's root context: configuration, metrics and the policy feed.
#[derive(Default)]
struct Root {
    policy: SharedPolicy,
    metrics: Option<Rc<Metrics>>,
    feed: Option<Feed>,
}

impl Root {
    fn configure(&mut self) -> Result<(), Vec<String>> {
        let raw = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) if !bytes.is_empty() => bytes,
            Ok(_) => {
                return Err(vec![
                    "the plugin configuration is empty; give it {\"policy\": …}, {\"feed\": …} or both"
                        .into(),
                ]);
            }
            Err(status) => {
                return Err(vec![format!(
                    "could not read the plugin configuration: {status:?}"
                )]);
            }
        };
        // The policy is compiled while it is parsed, so a large one never exists as a whole
        // document: the VM's memory only grows, so its peak during this call is what stays.
        let config = CompiledPluginConfig::from_json(&raw)
            .map_err(|e| vec![format!("the plugin configuration is not valid: {e}")])?;
        drop(raw);
        if config.policy.is_none() && config.feed.is_none() {
            return Err(vec![
                "the plugin configuration needs \"policy\", \"feed\" or both".into(),
            ]);
        }
        let policy = match config.policy {
            Some(compiled) => compiled.map_err(|e| {
                e.problems()
                    .iter()
                    .map(|p| format!("policy.{p}"))
                    .collect::<Vec<_>>()
            })?,
            None => Policy::empty(),
        };
        let feed = match config.feed {
            Some(feed_config) => Some(Feed::new(feed_config).map_err(|e| vec![e])?),
            None => None,
        };
        let metrics = match &self.metrics {
            Some(metrics) => Rc::clone(metrics),
            None => Rc::new(Metrics::define()),
        };
        metrics.policy_applied(&policy);
        log(
            LogLevel::Info,
            &format!(
                "configured with policy {:?} ({} sites){}",
                policy.version(),
                policy.site_count(),
                match &feed {
                    Some(f) => format!(", polling {}", f.describe()),
                    None => String::new(),
                }
            ),
        );
        if let Some(feed) = &feed
            && let Err(status) = hostcalls::set_tick_period(feed.first_period())
        {
            return Err(vec![format!(
                "could not start the policy feed timer: {status:?}"
            )]);
        }
        *self.policy.borrow_mut() = policy;
        self.metrics = Some(metrics);
        self.feed = feed;
        Ok(())
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let (Some(feed), Some(metrics)) = (&mut self.feed, &self.metrics) {
            feed.on_response(token, num_headers, body_size, &self.policy, metrics);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match self.configure() {
            Ok(()) => true,
            Err(problems) => {
                for problem in &problems {
                    log(LogLevel::Error, problem);
                }
                log(
                    LogLevel::Error,
                    &format!(
                        "configuration rejected ({} problem(s)); fix them and reload",
                        problems.len()
                    ),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let (Some(feed), Some(metrics)) = (&mut self.feed, &self.metrics) {
            feed.on_tick(&self.policy, metrics);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let metrics = self.metrics.clone()?;
        Some(Box::new(Stream::new(Rc::clone(&self.policy), metrics)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// How long a feed call may take at most, as the host wants it.
pub(crate) fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}
