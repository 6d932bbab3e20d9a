//! The VM probe: host calls per request kind, policy apply time and VM memory, in the wasmtime
//! proxy-wasm host, in-process.

use super::*;

/// Host calls one request makes, by kind.
pub(crate) struct CallCounts {
    pub(crate) rows: Vec<(&'static str, BTreeMap<&'static str, u64>)>,
}

pub(crate) fn stream_calls(
    host: &mut Host,
    tls: bool,
    request: &[(&str, &str)],
    response: Option<&[(&str, &str)]>,
) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let before = host.host_call_counts().clone();
    let mut stream = host.http_stream()?;
    stream.set_property(&["source", "address"], "127.0.0.1:40000");
    if tls {
        stream.set_property(&["connection", "tls_version"], "TLSv1.3");
    }
    stream.request_headers(request, true)?;
    if stream.local_response().is_none()
        && let Some(response) = response
    {
        stream.response_headers(response, true)?;
    }
    stream.complete()?;
    let after = host.host_call_counts();
    Ok(after
        .iter()
        .filter_map(|(name, count)| {
            let delta = count - before.get(name).copied().unwrap_or(0);
            (delta > 0).then_some((*name, delta))
        })
        .collect())
}

pub(crate) fn host_calls(wasm: &Artefacts) -> anyhow::Result<CallCounts> {
    let n = 1_000;
    let module = FilterModule::load(&wasm.filter)?;
    let config = format!(r#"{{"policy": {}}}"#, policy_json(n, "calls"));
    let mut host = HostBuilder::new(&module)
        .plugin_configuration(config.into_bytes())
        .build()?;
    if !host.configuration_accepted() {
        bail!(
            "the filter rejected the benchmark policy: {:?}",
            host.logs()
        );
    }
    let force = force_host(n);
    let auto = auto_host(n);
    pub(crate) fn request<'a>(host: &'a str, path: &'a str) -> [(&'a str, &'a str); 5] {
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", host),
            (":path", path),
            ("user-agent", "bench"),
        ]
    }
    let ok: &[(&str, &str)] = &[(":status", "200"), ("content-type", "text/plain")];
    let mut rows = Vec::new();
    let r = request(&force, "/index.html?a=1");
    rows.push((
        "force redirect (HTTP, force site)",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    let r = request(&auto, "/index.html");
    rows.push((
        "auto pass-through over HTTPS, CSP added",
        stream_calls(&mut host, true, &r, Some(ok))?,
    ));
    let r = request(&force, "/index.html");
    rows.push((
        "force site over HTTPS, HSTS added",
        stream_calls(&mut host, true, &r, Some(ok))?,
    ));
    let r = request("unknown.example.org", "/");
    rows.push((
        "unknown host",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    let r = request(&force, "/.well-known/acme-challenge/token");
    rows.push((
        "ACME HTTP-01 path",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    let minimal = FilterModule::load(&wasm.minimal)?;
    let mut host = HostBuilder::new(&minimal).build()?;
    let r = request(&force, "/index.html?a=1");
    rows.push((
        "minimal filter (floor): redirect",
        stream_calls(&mut host, false, &r, Some(ok))?,
    ));
    Ok(CallCounts { rows })
}

// ---------------------------------------------------------------------------------------------
// Part 3a: policy apply time and VM memory, in-process

pub(crate) struct ScaleRow {
    pub(crate) sites: usize,
    pub(crate) json_bytes: usize,
    pub(crate) configure_ms: f64,
    pub(crate) feed_ms: f64,
    pub(crate) memory_bytes: u64,
    pub(crate) envoy_feed_ms: Vec<f64>,
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

pub(crate) fn scale_in_vm(wasm: &Artefacts, n: usize, json: &[u8]) -> anyhow::Result<ScaleRow> {
    let module = FilterModule::load(&wasm.filter)?;
    let mut inline = Vec::with_capacity(json.len() + 16);
    inline.extend_from_slice(b"{\"policy\": ");
    inline.extend_from_slice(json);
    inline.push(b'}');
    let repeats = if n >= 100_000 { 3 } else { 5 };

    // From on_configure: the host times the call alone; the memory size is read after it.
    let mut configure = Vec::new();
    let mut memory_bytes = 0;
    for _ in 0..repeats {
        let host = HostBuilder::new(&module)
            .plugin_configuration(inline.clone())
            .build()?;
        if !host.configuration_accepted() {
            bail!("the filter rejected the {n}-site policy: {:?}", host.logs());
        }
        configure.push(host.configure_time().as_secs_f64() * 1e3);
        memory_bytes = host.linear_memory_bytes();
    }

    // Through the feed: the VM already runs a tiny policy, then the feed delivers this one.
    let feed_config = br#"{"policy": {"schema": 1, "version": "boot", "sites": []}, "feed": {"cluster": "feed", "interval_ms": 1000}}"#;
    let mut feed = Vec::new();
    for _ in 0..repeats {
        let mut host = HostBuilder::new(&module)
            .plugin_configuration(feed_config.to_vec())
            .cluster("feed")
            .build()?;
        host.advance_clock(Duration::from_millis(1000))?;
        let token = host
            .pending_http_calls()
            .first()
            .map(|c| c.token)
            .ok_or_else(|| anyhow!("the filter did not poll its feed"))?;
        let started = Instant::now();
        host.respond_to_http_call(token, &[(":status", "200"), ("etag", "\"b\"")], json)?;
        feed.push(started.elapsed().as_secs_f64() * 1e3);
        let applied = host
            .metric("autohttps.policy_sites")
            .map(|m| m.value)
            .unwrap_or(0);
        if applied != n as u64 {
            bail!(
                "the feed did not apply the {n}-site policy: {:?}",
                host.logs()
            );
        }
    }
    Ok(ScaleRow {
        sites: n,
        json_bytes: json.len(),
        configure_ms: median(&mut configure),
        feed_ms: median(&mut feed),
        memory_bytes,
        envoy_feed_ms: Vec::new(),
    })
}
