//! Proxy-wasm ABI 0.2.1 values (status codes, enums) and the wire format of header pairs.
//!
//! Numbers follow the proxy-wasm spec and `proxy-wasm` 0.2.5 `src/types.rs`; the pairs format is
//! the one Envoy's `proxy-wasm-cpp-host` (`PairsUtil`) and the Rust SDK (`hostcalls::utils`) use:
//! a little-endian `u32` count, then `count` pairs of `u32` key and value sizes, then each key and
//! value followed by a NUL byte.

/// Result of a host call, as returned to the guest (`WasmResult` in Envoy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The call succeeded.
    Ok = 0,
    /// The key, property, metric or buffer does not exist.
    NotFound = 1,
    /// An argument is invalid, or the map or buffer is not available in this callback.
    BadArgument = 2,
    /// A value could not be serialized.
    SerializationFailure = 3,
    /// A value could not be parsed.
    ParseFailure = 4,
    /// An expression is invalid.
    BadExpression = 5,
    /// A pointer or size given by the guest lies outside its memory, or allocation failed.
    InvalidMemoryAccess = 6,
    /// Nothing to return (e.g. an empty queue).
    Empty = 7,
    /// Compare-and-swap failed: the shared data changed since it was read.
    CasMismatch = 8,
    /// The result does not match the expected type.
    ResultMismatch = 9,
    /// The host failed internally.
    InternalFailure = 10,
    /// The connection (e.g. of an HTTP call) broke.
    BrokenConnection = 11,
    /// The host does not implement this call.
    Unimplemented = 12,
}

impl Status {
    /// The raw value handed to the guest.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// The action a guest returns from a stream callback (`proxy_on_request_headers` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `0`: let the stream continue to the next filter.
    Continue,
    /// `1`: stop iteration (Envoy: `StopIteration` for headers, `StopIterationAndBuffer` for
    /// bodies) until the filter resumes the stream or answers it with a local response.
    Pause,
    /// Any other value (the 0.2.1 ABI defines a few more for headers; the Rust SDK never uses them).
    Other(u32),
}

impl Action {
    pub(crate) fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Action::Continue,
            1 => Action::Pause,
            other => Action::Other(other),
        }
    }
}

/// Log levels of `proxy_log` and `proxy_get_log_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    /// `0`
    Trace = 0,
    /// `1`
    Debug = 1,
    /// `2`
    Info = 2,
    /// `3`
    Warn = 3,
    /// `4`
    Error = 4,
    /// `5`
    Critical = 5,
}

impl LogLevel {
    pub(crate) fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// Kinds of metric `proxy_define_metric` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MetricType {
    /// Monotonic counter: `increment` by a positive offset, `record` adds.
    Counter = 0,
    /// Gauge: `increment` adds or subtracts, `record` sets.
    Gauge = 1,
    /// Histogram: `record` adds a sample; `get` is not supported (Envoy answers `BadArgument`).
    Histogram = 2,
}

impl MetricType {
    pub(crate) fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// Header maps a guest can address (`MapType` in the SDK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub(crate) fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            4 => MapType::GrpcInitialMetadata,
            5 => MapType::GrpcTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Buffers a guest can address (`BufferType` in the SDK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    HttpCallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    CallData,
}

impl BufferType {
    pub(crate) fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            _ => return None,
        })
    }
}

/// Stream directions of `proxy_continue_stream` / `proxy_close_stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamType {
    Request,
    Response,
    Downstream,
    Upstream,
}

impl StreamType {
    pub(crate) fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => StreamType::Request,
            1 => StreamType::Response,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// Serializes header pairs into the proxy-wasm pairs format.
pub(crate) fn encode_pairs<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Vec<u8> {
    let size = 4 + pairs
        .clone()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len_u32(pairs.clone().count()).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&len_u32(k.len()).to_le_bytes());
        out.extend_from_slice(&len_u32(v.len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses the proxy-wasm pairs format into raw `(key, value)` bytes; `None` when it is
/// malformed. Envoy takes any bytes, so neither side has to be UTF-8.
///
/// An empty input is an empty map (the SDK sends zero bytes for an empty list).
pub(crate) fn decode_pairs(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if data > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for n in 0..count {
        let key_len = read_u32(bytes, 4 + n * 8)? as usize;
        let value_len = read_u32(bytes, 8 + n * 8)? as usize;
        let key = bytes.get(data..data.checked_add(key_len)?)?;
        data = data.checked_add(key_len + 1)?;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len + 1)?;
        pairs.push((key.to_vec(), value.to_vec()));
    }
    Some(pairs)
}

/// Joins property path segments the way the ABI carries them: separated by NUL bytes.
pub(crate) fn join_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// Sizes on wasm32 are `u32`; anything larger cannot be handed to the guest anyway.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn encode(list: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encode_pairs(list.iter().map(|(k, v)| {
            (
                std::str::from_utf8(k).expect("test keys are UTF-8"),
                v.as_slice(),
            )
        }))
    }

    #[test]
    fn pairs_round_trip_through_the_wire_format() {
        let map = pairs(&[(":method", "GET"), (":path", "/bytes/1"), ("x-empty", "")]);
        assert_eq!(decode_pairs(&encode(&map)), Some(map));
    }

    #[test]
    fn values_that_are_not_utf8_round_trip_unchanged() {
        let map = vec![(b"x-raw".to_vec(), b"a\xff\xfeb".to_vec())];
        assert_eq!(decode_pairs(&encode(&map)), Some(map));
    }

    #[test]
    fn pairs_wire_format_matches_the_sdk_layout() {
        let bytes = encode(&pairs(&[("a", "bc")]));
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0]
        );
    }

    #[test]
    fn truncated_pairs_are_rejected() {
        let bytes = encode(&pairs(&[("key", "value")]));
        assert_eq!(decode_pairs(&bytes[..bytes.len() - 3]), None);
        assert_eq!(decode_pairs(&[9, 0, 0, 0]), None);
    }

    #[test]
    fn empty_input_is_an_empty_map() {
        assert_eq!(decode_pairs(&[]), Some(Vec::new()));
    }

    #[test]
    fn property_paths_are_nul_separated() {
        assert_eq!(join_path(&["source", "address"]), b"source\0address");
    }
}
