//! The host side of the proxy-wasm 0.2.1 imports (`env.proxy_*`), with Envoy's semantics.
//!
//! Each call follows Envoy's `source/extensions/common/wasm/context.cc` and
//! `proxy-wasm-cpp-host` `exports.cc`: which maps and buffers exist in which callback, which
//! status a failure returns, how bodies are replaced. Imports this host does not implement are
//! linked to a function that records a [`HostCallError`](crate::HostCallError) naming the call
//! and returns [`Status::Unimplemented`] (zero values for non-`i32` results): the guest sees an
//! error, the host never panics and never traps on its own account. (Envoy itself refuses to
//! load a module with an import it lacks; this host lets the test see which call it was.)

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Caller, ExternType, Linker, Module, Val, ValType};

use crate::abi::{
    BufferType, LogLevel, MapType, MetricType, Status, StreamType, decode_pairs, encode_pairs,
    len_u32,
};
use crate::state::{
    Headers, HostState, HttpCall, LocalResponse, LogEntry, Metric, SharedQueue, StreamState,
};

/// The `env` imports this host implements, in ABI order.
pub const SUPPORTED_HOST_CALLS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_header_map_size",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_call_foreign_function",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_get_status",
];

type Ctx<'a> = Caller<'a, HostState>;

/// Why a host call did not return `Ok`: a status for the guest, or a trap of the guest itself
/// (its allocator trapped while the host was handing it a buffer) that must propagate.
enum Fail {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for Fail {
    fn from(status: Status) -> Self {
        Fail::Status(status)
    }
}

type Outcome = Result<(), Fail>;

/// Counts the call, runs it, records memory faults, and turns the outcome into a status code.
fn run<'a>(
    c: &mut Ctx<'a>,
    name: &'static str,
    call: impl FnOnce(&mut Ctx<'a>) -> Outcome,
) -> wasmtime::Result<u32> {
    let state = c.data_mut();
    *state.call_counts.entry(name).or_default() += 1;
    let context = state.effective_context;
    if let Some(stream) = state.streams.get_mut(&context) {
        stream.host_calls += 1;
    }
    match call(c) {
        Ok(()) => Ok(Status::Ok.code()),
        Err(Fail::Status(Status::InvalidMemoryAccess)) => {
            c.data_mut().record_error(
                name,
                Status::InvalidMemoryAccess,
                "a pointer or size lies outside guest memory, or the guest allocator failed"
                    .to_owned(),
            );
            Ok(Status::InvalidMemoryAccess.code())
        }
        Err(Fail::Status(status)) => Ok(status.code()),
        Err(Fail::Trap(trap)) => Err(trap),
    }
}

fn read_bytes(c: &Ctx<'_>, ptr: u32, len: u32) -> Result<Vec<u8>, Status> {
    let memory = c.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    memory
        .data(c)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

fn read_string(c: &Ctx<'_>, ptr: u32, len: u32) -> Result<String, Status> {
    Ok(String::from_utf8_lossy(&read_bytes(c, ptr, len)?).into_owned())
}

fn write_bytes(c: &mut Ctx<'_>, ptr: u32, bytes: &[u8]) -> Result<(), Status> {
    let memory = c.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    memory
        .write(c, ptr as usize, bytes)
        .map_err(|_| Status::InvalidMemoryAccess)
}

fn write_u32(c: &mut Ctx<'_>, ptr: u32, value: u32) -> Result<(), Status> {
    write_bytes(c, ptr, &value.to_le_bytes())
}

fn write_u64(c: &mut Ctx<'_>, ptr: u32, value: u64) -> Result<(), Status> {
    write_bytes(c, ptr, &value.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, then stores pointer and size (Envoy's
/// `copyToPointerSize`: an empty value stores a null pointer and size 0).
fn copy_out(c: &mut Ctx<'_>, bytes: &[u8], ptr_ptr: u32, size_ptr: u32) -> Outcome {
    let mut pointer = 0;
    if !bytes.is_empty() {
        let allocate = c
            .data()
            .allocate
            .clone()
            .ok_or(Status::InvalidMemoryAccess)?;
        pointer = allocate
            .call(&mut *c, len_u32(bytes.len()))
            .map_err(Fail::Trap)?;
        if pointer == 0 {
            return Err(Status::InvalidMemoryAccess.into());
        }
        write_bytes(c, pointer, bytes)?;
    }
    write_u32(c, ptr_ptr, pointer)?;
    write_u32(c, size_ptr, len_u32(bytes.len()))?;
    Ok(())
}

/// Registers every supported call on `linker`.
pub(crate) fn add_proxy_calls(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Ctx<'_>, level: u32, ptr: u32, len: u32| {
            run(&mut c, "proxy_log", |c| log(c, level, ptr, len))
        },
    )?;
    linker.func_wrap("env", "proxy_get_log_level", |mut c: Ctx<'_>, ret: u32| {
        run(&mut c, "proxy_get_log_level", |c| {
            let level = c.data().log_level as u32;
            Ok(write_u32(c, ret, level)?)
        })
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, ret: u32| {
            run(&mut c, "proxy_get_current_time_nanoseconds", |c| {
                let now = c.data().clock.now_unix_nanos();
                Ok(write_u64(c, ret, now)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, period: u32| {
            run(&mut c, "proxy_set_tick_period_milliseconds", |c| {
                set_tick_period(c.data_mut(), period);
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>, ty: u32, start: u32, max: u32, ptr_ptr: u32, size_ptr: u32| {
            run(&mut c, "proxy_get_buffer_bytes", |c| {
                get_buffer_bytes(c, ty, start, max, ptr_ptr, size_ptr)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Ctx<'_>, ty: u32, len_ptr: u32, flags_ptr: u32| {
            run(&mut c, "proxy_get_buffer_status", |c| {
                let ty = BufferType::from_raw(ty).ok_or(Status::BadArgument)?;
                let len = len_u32(buffer(c.data_mut(), ty)?.len());
                write_u32(c, len_ptr, len)?;
                Ok(write_u32(c, flags_ptr, 0)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, ty: u32, start: u32, size: u32, ptr: u32, len: u32| {
            run(&mut c, "proxy_set_buffer_bytes", |c| {
                set_buffer_bytes(c, ty, start, size, ptr, len)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, ty: u32, ptr_ptr: u32, size_ptr: u32| {
            run(&mut c, "proxy_get_header_map_pairs", |c| {
                let ty = MapType::from_raw(ty).ok_or(Status::BadArgument)?;
                let bytes = match readable_map(c.data_mut(), ty) {
                    Some(map) if !map.is_empty() => encode_pairs(map.byte_pairs()),
                    _ => Vec::new(),
                };
                copy_out(c, &bytes, ptr_ptr, size_ptr)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, ty: u32, ptr: u32, len: u32| {
            run(&mut c, "proxy_set_header_map_pairs", |c| {
                let ty = MapType::from_raw(ty).ok_or(Status::BadArgument)?;
                let pairs = decode_pairs(&read_bytes(c, ptr, len)?).ok_or(Status::BadArgument)?;
                let map = writable_map(c.data_mut(), ty).ok_or(Status::BadArgument)?;
                *map = Headers::from_wire(pairs);
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, ty: u32, key_ptr: u32, key_len: u32, ptr_ptr: u32, size_ptr: u32| {
            run(&mut c, "proxy_get_header_map_value", |c| {
                get_header_map_value(c, ty, key_ptr, key_len, ptr_ptr, size_ptr)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Ctx<'_>, ty: u32, key_ptr: u32, key_len: u32, value_ptr: u32, value_len: u32| {
            run(&mut c, "proxy_add_header_map_value", |c| {
                edit_map(c, ty, key_ptr, key_len, value_ptr, value_len, Headers::add)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Ctx<'_>, ty: u32, key_ptr: u32, key_len: u32, value_ptr: u32, value_len: u32| {
            run(&mut c, "proxy_replace_header_map_value", |c| {
                edit_map(
                    c,
                    ty,
                    key_ptr,
                    key_len,
                    value_ptr,
                    value_len,
                    Headers::replace,
                )
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, ty: u32, key_ptr: u32, key_len: u32| {
            run(&mut c, "proxy_remove_header_map_value", |c| {
                let ty = MapType::from_raw(ty).ok_or(Status::BadArgument)?;
                let key = read_string(c, key_ptr, key_len)?;
                let map = writable_map(c.data_mut(), ty).ok_or(Status::BadArgument)?;
                map.remove(&key);
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: Ctx<'_>, ty: u32, ret: u32| {
            run(&mut c, "proxy_get_header_map_size", |c| {
                let ty = MapType::from_raw(ty).ok_or(Status::BadArgument)?;
                let map = writable_map(c.data_mut(), ty).ok_or(Status::BadArgument)?;
                let size = len_u32(map.byte_size());
                Ok(write_u32(c, ret, size)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Ctx<'_>, path_ptr: u32, path_len: u32, ptr_ptr: u32, size_ptr: u32| {
            run(&mut c, "proxy_get_property", |c| {
                let path = read_bytes(c, path_ptr, path_len)?;
                let value = property(c.data_mut(), &path).ok_or(Status::NotFound)?;
                copy_out(c, &value, ptr_ptr, size_ptr)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Ctx<'_>, path_ptr: u32, path_len: u32, value_ptr: u32, value_len: u32| {
            run(&mut c, "proxy_set_property", |c| {
                let path = read_bytes(c, path_ptr, path_len)?;
                let value = read_bytes(c, value_ptr, value_len)?;
                // Envoy stores it in the stream's filter state; without a stream there is none.
                let stream = c.data_mut().effective_stream().ok_or(Status::NotFound)?;
                stream.properties.insert(path, value);
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, key_ptr: u32, key_len: u32, ptr_ptr: u32, size_ptr: u32, cas_ptr: u32| {
            run(&mut c, "proxy_get_shared_data", |c| {
                let key = read_bytes(c, key_ptr, key_len)?;
                let (value, cas) = c
                    .data()
                    .shared_data
                    .get(&key)
                    .cloned()
                    .ok_or(Status::NotFound)?;
                copy_out(c, &value, ptr_ptr, size_ptr)?;
                Ok(write_u32(c, cas_ptr, cas)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, key_ptr: u32, key_len: u32, value_ptr: u32, value_len: u32, cas: u32| {
            run(&mut c, "proxy_set_shared_data", |c| {
                let key = read_bytes(c, key_ptr, key_len)?;
                let value = read_bytes(c, value_ptr, value_len)?;
                Ok(set_shared_data(c.data_mut(), key, value, cas)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, name_ptr: u32, name_len: u32, token_ptr: u32| {
            run(&mut c, "proxy_register_shared_queue", |c| {
                let name = read_string(c, name_ptr, name_len)?;
                let token = register_shared_queue(c.data_mut(), name);
                Ok(write_u32(c, token_ptr, token)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Ctx<'_>,
         vm_id_ptr: u32,
         vm_id_len: u32,
         name_ptr: u32,
         name_len: u32,
         token_ptr: u32| {
            run(&mut c, "proxy_resolve_shared_queue", |c| {
                let vm_id = read_string(c, vm_id_ptr, vm_id_len)?;
                let name = read_string(c, name_ptr, name_len)?;
                let token = c
                    .data()
                    .shared_queues
                    .iter()
                    .find(|q| q.vm_id == vm_id && q.name == name)
                    .map(|q| q.token)
                    .ok_or(Status::NotFound)?;
                Ok(write_u32(c, token_ptr, token)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, token: u32, ptr_ptr: u32, size_ptr: u32| {
            run(&mut c, "proxy_dequeue_shared_queue", |c| {
                let queue = c
                    .data_mut()
                    .shared_queues
                    .iter_mut()
                    .find(|q| q.token == token)
                    .ok_or(Status::NotFound)?;
                let item = queue.items.pop_front().ok_or(Status::Empty)?;
                copy_out(c, &item, ptr_ptr, size_ptr)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, token: u32, ptr: u32, len: u32| {
            run(&mut c, "proxy_enqueue_shared_queue", |c| {
                let item = read_bytes(c, ptr, len)?;
                Ok(c.data_mut().enqueue_shared_queue(token, item)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Ctx<'_>,
         name_ptr: u32,
         name_len: u32,
         _args_ptr: u32,
         _args_len: u32,
         _ret_ptr_ptr: u32,
         _ret_size_ptr: u32| {
            run(&mut c, "proxy_call_foreign_function", |c| {
                let name = read_string(c, name_ptr, name_len)?;
                // Envoy answers NotFound for a name it has not registered. It registers the
                // ones below; this host carries none of them, so it answers NotFound too and
                // records the call, since Envoy would have run it.
                if ENVOY_FOREIGN_FUNCTIONS.contains(&name.as_str()) {
                    c.data_mut().record_error(
                        "proxy_call_foreign_function",
                        Status::NotFound,
                        format!(
                            "Envoy's foreign function {name:?} is not carried by this host; it answers NotFound, as Envoy does for an unknown name"
                        ),
                    );
                }
                Err(Status::NotFound.into())
            })
        },
    )?;
    linker.func_wrap("env", "proxy_continue_stream", |mut c: Ctx<'_>, ty: u32| {
        run(&mut c, "proxy_continue_stream", |c| {
            let ty = StreamType::from_raw(ty).ok_or(Status::BadArgument)?;
            Ok(continue_stream(c.data_mut(), ty)?)
        })
    })?;
    linker.func_wrap("env", "proxy_continue_request", |mut c: Ctx<'_>| {
        run(&mut c, "proxy_continue_request", |c| {
            Ok(continue_stream(c.data_mut(), StreamType::Request)?)
        })
    })?;
    linker.func_wrap("env", "proxy_continue_response", |mut c: Ctx<'_>| {
        run(&mut c, "proxy_continue_response", |c| {
            Ok(continue_stream(c.data_mut(), StreamType::Response)?)
        })
    })?;
    linker.func_wrap("env", "proxy_close_stream", |mut c: Ctx<'_>, ty: u32| {
        run(&mut c, "proxy_close_stream", |c| {
            let ty = StreamType::from_raw(ty).ok_or(Status::BadArgument)?;
            if let Some(stream) = c.data_mut().effective_stream() {
                match ty {
                    StreamType::Request => stream.closed_request = true,
                    StreamType::Response => stream.closed_response = true,
                    StreamType::Downstream | StreamType::Upstream => {}
                }
            }
            Ok(())
        })
    })?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         status: u32,
         details_ptr: u32,
         details_len: u32,
         body_ptr: u32,
         body_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         grpc_status: i32| {
            run(&mut c, "proxy_send_local_response", |c| {
                // Envoy replaces white space in details with '_'.
                let details: String = read_string(c, details_ptr, details_len)?
                    .chars()
                    .map(|ch| if ch.is_whitespace() { '_' } else { ch })
                    .collect();
                let body = read_bytes(c, body_ptr, body_len)?;
                let headers = decode_pairs(&read_bytes(c, headers_ptr, headers_len)?)
                    .ok_or(Status::BadArgument)?;
                // Without a stream (a root context) Envoy has no decoder callbacks: a no-op.
                if let Some(stream) = c.data_mut().effective_stream() {
                    stream.local_responses.push(LocalResponse {
                        status,
                        headers: Headers::from_wire(headers),
                        body,
                        details,
                        grpc_status,
                    });
                }
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Ctx<'_>,
         upstream_ptr: u32,
         upstream_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         body_ptr: u32,
         body_len: u32,
         trailers_ptr: u32,
         trailers_len: u32,
         timeout_ms: u32,
         token_ptr: u32| {
            run(&mut c, "proxy_http_call", |c| {
                let upstream = read_string(c, upstream_ptr, upstream_len)?;
                let headers = decode_pairs(&read_bytes(c, headers_ptr, headers_len)?)
                    .ok_or(Status::BadArgument)?;
                let body = read_bytes(c, body_ptr, body_len)?;
                let trailers = decode_pairs(&read_bytes(c, trailers_ptr, trailers_len)?)
                    .ok_or(Status::BadArgument)?;
                let token = http_call(c.data_mut(), upstream, headers, body, trailers, timeout_ms)?;
                Ok(write_u32(c, token_ptr, token)?)
            })
        },
    )?;
    // gRPC: Envoy resolves the service to a cluster; for one it does not know it answers
    // ParseFailure, and for a token it never handed out NotFound. This host carries no gRPC,
    // so every service is answered as a missing cluster; one the test declared with
    // `HostBuilder::cluster` is also recorded as a host-call error, since Envoy would have
    // made that call.
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: Ctx<'_>,
         service_ptr: u32,
         service_len: u32,
         _service_name_ptr: u32,
         _service_name_len: u32,
         _method_ptr: u32,
         _method_len: u32,
         _metadata_ptr: u32,
         _metadata_len: u32,
         _message_ptr: u32,
         _message_len: u32,
         _timeout_ms: u32,
         _token_ptr: u32| {
            run(&mut c, "proxy_grpc_call", |c| {
                grpc_open(c, "proxy_grpc_call", service_ptr, service_len)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: Ctx<'_>,
         service_ptr: u32,
         service_len: u32,
         _service_name_ptr: u32,
         _service_name_len: u32,
         _method_ptr: u32,
         _method_len: u32,
         _metadata_ptr: u32,
         _metadata_len: u32,
         _token_ptr: u32| {
            run(&mut c, "proxy_grpc_stream", |c| {
                grpc_open(c, "proxy_grpc_stream", service_ptr, service_len)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: Ctx<'_>, token: u32, _ptr: u32, _len: u32, _end: u32| {
            run(&mut c, "proxy_grpc_send", |_| {
                // Envoy: odd tokens are calls (nothing to send on), even ones streams.
                Err(if token % 2 == 1 {
                    Status::BadArgument
                } else {
                    Status::NotFound
                }
                .into())
            })
        },
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |mut c: Ctx<'_>, _token: u32| {
        run(
            &mut c,
            "proxy_grpc_cancel",
            |_| Err(Status::NotFound.into()),
        )
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |mut c: Ctx<'_>, _token: u32| {
        run(&mut c, "proxy_grpc_close", |_| Err(Status::NotFound.into()))
    })?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, context_id: u32| {
            run(&mut c, "proxy_set_effective_context", |c| {
                let state = c.data_mut();
                if context_id != state.root_context_id && !state.streams.contains_key(&context_id) {
                    return Err(Status::BadArgument.into());
                }
                state.effective_context = context_id;
                Ok(())
            })
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: Ctx<'_>| {
        run(&mut c, "proxy_done", |c| {
            let state = c.data_mut();
            if state.effective_context != state.root_context_id || !state.root_done_pending {
                return Err(Status::NotFound.into());
            }
            state.root_done_pending = false;
            state.root_done = true;
            Ok(())
        })
    })?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Ctx<'_>, ty: u32, name_ptr: u32, name_len: u32, id_ptr: u32| {
            run(&mut c, "proxy_define_metric", |c| {
                let kind = MetricType::from_raw(ty).ok_or(Status::BadArgument)?;
                let name = read_string(c, name_ptr, name_len)?;
                let id = define_metric(c.data_mut(), kind, name);
                Ok(write_u32(c, id_ptr, id)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Ctx<'_>, id: u32, offset: i64| {
            run(&mut c, "proxy_increment_metric", |c| {
                Ok(increment_metric(c.data_mut(), id, offset)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: Ctx<'_>, id: u32, value: u64| {
            run(&mut c, "proxy_record_metric", |c| {
                Ok(record_metric(c.data_mut(), id, value)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: u32, ret: u32| {
            run(&mut c, "proxy_get_metric", |c| {
                let value = get_metric(c.data_mut(), id)?;
                Ok(write_u64(c, ret, value)?)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Ctx<'_>, code_ptr: u32, ptr_ptr: u32, size_ptr: u32| {
            run(&mut c, "proxy_get_status", |c| {
                let (code, message) = c.data().status.clone();
                write_u32(c, code_ptr, code)?;
                copy_out(c, message.as_bytes(), ptr_ptr, size_ptr)
            })
        },
    )?;
    Ok(())
}

/// Links every function import of `module` that nothing else defined to a function that
/// records the call as unsupported and returns an error to the guest. Returns the names so
/// linked (`proxy_grpc_call`, or `module.name` outside `env`).
pub(crate) fn link_unsupported(linker: &mut Linker<HostState>, module: &Module) -> Vec<String> {
    let mut unsupported = Vec::new();
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let name: Arc<str> = if import.module() == "env" {
            import.name().into()
        } else {
            format!("{}.{}", import.module(), import.name()).into()
        };
        let results: Vec<ValType> = ty.results().collect();
        let recorded = Arc::clone(&name);
        // Shadowing is off, so this fails exactly when the import is already implemented.
        let linked = linker.func_new(
            import.module(),
            import.name(),
            ty.clone(),
            move |mut c: Ctx<'_>, _params: &[Val], out: &mut [Val]| {
                c.data_mut().record_error(
                    &recorded,
                    Status::Unimplemented,
                    format!(
                        "host call {recorded} is not supported by the wasmtime proxy-wasm host"
                    ),
                );
                for (slot, ty) in out.iter_mut().zip(&results) {
                    *slot = match ty {
                        ValType::I32 => Val::I32(Status::Unimplemented.code() as i32),
                        other => Val::default_for_ty(other).unwrap_or(Val::I64(0)),
                    };
                }
                Ok(())
            },
        );
        if linked.is_ok() {
            unsupported.push(name.to_string());
        }
    }
    unsupported
}

fn log(c: &mut Ctx<'_>, level: u32, ptr: u32, len: u32) -> Outcome {
    let level = LogLevel::from_raw(level).ok_or(Status::BadArgument)?;
    let message = read_string(c, ptr, len)?;
    let state = c.data_mut();
    let context_id = state.effective_context;
    state.logs.push(LogEntry {
        level,
        message,
        context_id,
    });
    Ok(())
}

fn set_tick_period(state: &mut HostState, period_ms: u32) {
    if period_ms == 0 {
        state.tick_period = None;
        state.next_tick_unix_nanos = None;
    } else {
        let period = Duration::from_millis(u64::from(period_ms));
        state.tick_period = Some(period);
        state.next_tick_unix_nanos = Some(
            state
                .clock
                .now_unix_nanos()
                .saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX)),
        );
    }
}

/// The buffer of `ty` as Envoy's `getBuffer` sees it now. Bodies outside their callbacks are
/// empty (Envoy hands out a buffer wrapping a null pointer); configuration and HTTP call
/// bodies outside their callbacks do not exist.
fn buffer(state: &mut HostState, ty: BufferType) -> Result<&[u8], Status> {
    match ty {
        BufferType::VmConfiguration => Ok(&state.vm_configuration),
        BufferType::PluginConfiguration if state.configuring => Ok(&state.plugin_configuration),
        BufferType::PluginConfiguration => Err(Status::NotFound),
        BufferType::HttpCallResponseBody => state
            .http_call_reply
            .as_ref()
            .map(|reply| reply.body.as_slice())
            .ok_or(Status::NotFound),
        BufferType::RequestBody => Ok(state
            .effective_stream()
            .filter(|s| s.request_body_available)
            .map_or(&[][..], |s| &s.request_body)),
        BufferType::ResponseBody => Ok(state
            .effective_stream()
            .filter(|s| s.response_body_available)
            .map_or(&[][..], |s| &s.response_body)),
        BufferType::DownstreamData
        | BufferType::UpstreamData
        | BufferType::GrpcReceiveBuffer
        | BufferType::CallData => Ok(&[]),
    }
}

fn get_buffer_bytes(
    c: &mut Ctx<'_>,
    ty: u32,
    start: u32,
    max: u32,
    ptr_ptr: u32,
    size_ptr: u32,
) -> Outcome {
    let ty = BufferType::from_raw(ty).ok_or(Status::BadArgument)?;
    let start = start as usize;
    let bytes = {
        let data = buffer(c.data_mut(), ty)?;
        if start >= data.len() || max == 0 {
            // Envoy returns Ok without touching the out-pointers: the SDK sees "no bytes".
            return Ok(());
        }
        let end = start.saturating_add(max as usize).min(data.len());
        data[start..end].to_vec()
    };
    copy_out(c, &bytes, ptr_ptr, size_ptr)
}

fn set_buffer_bytes(
    c: &mut Ctx<'_>,
    ty: u32,
    start: u32,
    size: u32,
    ptr: u32,
    len: u32,
) -> Outcome {
    let ty = BufferType::from_raw(ty).ok_or(Status::BadArgument)?;
    let data = read_bytes(c, ptr, len)?;
    let stream = c.data_mut().effective_stream().ok_or(Status::BadArgument)?;
    let body = match ty {
        BufferType::RequestBody if stream.request_body_available => &mut stream.request_body,
        BufferType::ResponseBody if stream.response_body_available => &mut stream.response_body,
        // Configuration and HTTP call bodies are immutable in Envoy.
        _ => return Err(Status::BadArgument.into()),
    };
    // Envoy `Buffer::copyFrom`: replace a prefix, or append at/after the end.
    let (start, size) = (start as usize, size as usize);
    if start == 0 {
        body.drain(..size.min(body.len()));
        body.splice(0..0, data);
    } else if start >= body.len() {
        body.extend_from_slice(&data);
    } else {
        return Err(Status::BadArgument.into());
    }
    Ok(())
}

/// The map of `ty` for reading, as Envoy's `getConstMap` sees it now; `None` when absent.
fn readable_map(state: &mut HostState, ty: MapType) -> Option<&Headers> {
    match ty {
        MapType::HttpCallResponseHeaders => state.http_call_reply.as_ref().map(|r| &r.headers),
        MapType::HttpCallResponseTrailers => state.http_call_reply.as_ref().map(|r| &r.trailers),
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
        MapType::RequestHeaders
        | MapType::RequestTrailers
        | MapType::ResponseHeaders
        | MapType::ResponseTrailers => {
            let stream = state.effective_stream()?;
            stream_map(stream, ty)
        }
    }
}

fn stream_map(stream: &StreamState, ty: MapType) -> Option<&Headers> {
    if stream.access_log_phase {
        return match ty {
            MapType::RequestHeaders => Some(&stream.request_headers),
            MapType::ResponseHeaders => Some(&stream.response_headers),
            MapType::ResponseTrailers => Some(&stream.response_trailers),
            _ => None,
        };
    }
    match ty {
        MapType::RequestHeaders if stream.request_headers_available => {
            Some(&stream.request_headers)
        }
        MapType::RequestTrailers if stream.request_trailers_available => {
            Some(&stream.request_trailers)
        }
        MapType::ResponseHeaders if stream.response_headers_available => {
            Some(&stream.response_headers)
        }
        MapType::ResponseTrailers if stream.response_trailers_available => {
            Some(&stream.response_trailers)
        }
        _ => None,
    }
}

/// The map of `ty` for writing, as Envoy's `getMap` sees it now; `None` when absent.
fn writable_map(state: &mut HostState, ty: MapType) -> Option<&mut Headers> {
    let stream = state.effective_stream()?;
    match ty {
        MapType::RequestHeaders if stream.request_headers_available => {
            Some(&mut stream.request_headers)
        }
        MapType::RequestTrailers => {
            // Envoy adds trailers when asked during the last body callback.
            if !stream.request_trailers_available
                && stream.request_body_available
                && stream.end_of_stream
            {
                stream.request_trailers_available = true;
            }
            stream
                .request_trailers_available
                .then_some(&mut stream.request_trailers)
        }
        MapType::ResponseHeaders if stream.response_headers_available => {
            Some(&mut stream.response_headers)
        }
        MapType::ResponseTrailers => {
            if !stream.response_trailers_available
                && stream.response_body_available
                && stream.end_of_stream
            {
                stream.response_trailers_available = true;
            }
            stream
                .response_trailers_available
                .then_some(&mut stream.response_trailers)
        }
        _ => None,
    }
}

fn get_header_map_value(
    c: &mut Ctx<'_>,
    ty: u32,
    key_ptr: u32,
    key_len: u32,
    ptr_ptr: u32,
    size_ptr: u32,
) -> Outcome {
    let ty = MapType::from_raw(ty).ok_or(Status::BadArgument)?;
    let key = read_string(c, key_ptr, key_len)?;
    let state = c.data_mut();
    let access_log_phase = state.effective_stream().is_some_and(|s| s.access_log_phase);
    let value = match readable_map(state, ty) {
        Some(map) => map
            .get_bytes(&key)
            .map(<[u8]>::to_vec)
            .ok_or(Status::NotFound)?,
        None if access_log_phase => return Err(Status::NotFound.into()),
        // The map is not available in this callback.
        None => return Err(Status::BadArgument.into()),
    };
    copy_out(c, &value, ptr_ptr, size_ptr)
}

fn edit_map(
    c: &mut Ctx<'_>,
    ty: u32,
    key_ptr: u32,
    key_len: u32,
    value_ptr: u32,
    value_len: u32,
    edit: fn(&mut Headers, &str, &[u8]),
) -> Outcome {
    let ty = MapType::from_raw(ty).ok_or(Status::BadArgument)?;
    let key = read_string(c, key_ptr, key_len)?;
    let value = read_bytes(c, value_ptr, value_len)?;
    let map = writable_map(c.data_mut(), ty).ok_or(Status::BadArgument)?;
    edit(map, &key, &value);
    Ok(())
}

/// Property lookup: the stream's own properties (given by the test or set by the filter),
/// then attributes Envoy derives from the headers available now, then the host's properties.
fn property(state: &mut HostState, path: &[u8]) -> Option<Vec<u8>> {
    if let Some(stream) = state.streams.get(&state.effective_context) {
        if let Some(value) = stream.properties.get(path) {
            return Some(value.clone());
        }
        if let Some(value) = derived_property(stream, path) {
            return Some(value);
        }
    }
    state.properties.get(path).cloned()
}

/// Envoy's `request.*` and `response.code` attributes, from the maps available now.
fn derived_property(stream: &StreamState, path: &[u8]) -> Option<Vec<u8>> {
    let path = std::str::from_utf8(path).ok()?;
    let mut parts = path.split('\0');
    let (top, field) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    match top {
        "request" => {
            let headers = stream_map(stream, MapType::RequestHeaders)?;
            let header = |name: &str| headers.get_bytes(name).map(<[u8]>::to_vec);
            let raw_path = headers.get(":path");
            match field {
                "path" => header(":path"),
                "url_path" => {
                    raw_path.map(|p| p.split('?').next().unwrap_or(p).as_bytes().to_vec())
                }
                "query" => {
                    raw_path.map(|p| p.split_once('?').map_or("", |(_, q)| q).as_bytes().to_vec())
                }
                "host" => header(":authority"),
                "scheme" => header(":scheme"),
                "method" => header(":method"),
                "referer" => header("referer"),
                "useragent" => header("user-agent"),
                "id" => header("x-request-id"),
                _ => None,
            }
        }
        "response" if field == "code" => {
            let headers = stream_map(stream, MapType::ResponseHeaders)?;
            let code: i64 = headers.get(":status")?.parse().ok()?;
            Some(code.to_le_bytes().to_vec())
        }
        _ => None,
    }
}

fn set_shared_data(
    state: &mut HostState,
    key: Vec<u8>,
    value: Vec<u8>,
    cas: u32,
) -> Result<(), Status> {
    if let Some((_, current)) = state.shared_data.get(&key)
        && cas != 0
        && cas != *current
    {
        return Err(Status::CasMismatch);
    }
    let next = state.next_cas;
    state.next_cas = state.next_cas.checked_add(1).unwrap_or(1);
    state.shared_data.insert(key, (value, next));
    Ok(())
}

/// Envoy's `continueStream`: resumes the direction and (for both HTTP directions, as Envoy
/// does) drops its pointers to the request maps and body.
fn continue_stream(state: &mut HostState, ty: StreamType) -> Result<(), Status> {
    match ty {
        StreamType::Downstream => return Ok(()),
        StreamType::Upstream => return Err(Status::Unimplemented),
        StreamType::Request | StreamType::Response => {}
    }
    if let Some(stream) = state.effective_stream() {
        if ty == StreamType::Request {
            stream.continued_request += 1;
        } else {
            stream.continued_response += 1;
        }
        stream.request_headers_available = false;
        stream.request_body_available = false;
        stream.request_trailers_available = false;
    }
    Ok(())
}

fn http_call(
    state: &mut HostState,
    upstream: String,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Vec<(Vec<u8>, Vec<u8>)>,
    timeout_ms: u32,
) -> Result<u32, Status> {
    if i32::try_from(timeout_ms).is_err() {
        return Err(Status::BadArgument);
    }
    if let Some(known) = &state.known_clusters
        && !known.contains(&upstream)
    {
        return Err(Status::BadArgument);
    }
    let mut headers = Headers::from_wire(headers);
    if [":path", ":method", ":authority"]
        .iter()
        .any(|required| !headers.contains(required))
    {
        return Err(Status::BadArgument);
    }
    if !body.is_empty() {
        headers.replace("content-length", body.len().to_string().as_bytes());
    }
    let token = state.next_http_token;
    state.next_http_token = state.next_http_token.wrapping_add(1).max(1);
    let deadline_unix_nanos = (timeout_ms > 0).then(|| {
        state
            .clock
            .now_unix_nanos()
            .saturating_add(u64::from(timeout_ms) * 1_000_000)
    });
    state.http_calls.push(HttpCall {
        token,
        context_id: state.effective_context,
        upstream,
        headers,
        body,
        trailers: Headers::from_wire(trailers),
        timeout: Duration::from_millis(u64::from(timeout_ms)),
        deadline_unix_nanos,
    });
    state.pending_http_calls.push(token);
    Ok(token)
}

/// Opens a gRPC call or stream as Envoy does for a service naming no cluster it knows.
fn grpc_open(c: &mut Ctx<'_>, call: &str, service_ptr: u32, service_len: u32) -> Outcome {
    let service = read_string(c, service_ptr, service_len)?;
    let state = c.data_mut();
    if state
        .known_clusters
        .as_ref()
        .is_some_and(|known| known.contains(&service))
    {
        state.record_error(
            call,
            Status::ParseFailure,
            format!(
                "gRPC to the declared cluster {service:?} is not carried by this host; it answers every gRPC service as a missing cluster (ParseFailure)"
            ),
        );
    }
    Err(Status::ParseFailure.into())
}

/// Foreign functions Envoy 1.40 registers (`source/extensions/common/wasm/foreign.cc`).
const ENVOY_FOREIGN_FUNCTIONS: &[&str] = &[
    "compress",
    "uncompress",
    "expr_create",
    "expr_evaluate",
    "expr_delete",
    "declare_property",
    "set_envoy_filter_state",
    "clear_route_cache",
    "verify_signature",
];

/// Envoy's `registerSharedQueue`: one queue per (VM id, name); registering again keeps the
/// token and makes the registering context the one notified.
fn register_shared_queue(state: &mut HostState, name: String) -> u32 {
    let context = state.effective_context;
    if let Some(queue) = state
        .shared_queues
        .iter_mut()
        .find(|q| q.vm_id == state.vm_id && q.name == name)
    {
        queue.owner_context = context;
        return queue.token;
    }
    let token = state.next_queue_token;
    state.next_queue_token = state.next_queue_token.wrapping_add(1).max(1);
    state.shared_queues.push(SharedQueue {
        vm_id: state.vm_id.clone(),
        name,
        token,
        owner_context: context,
        items: VecDeque::new(),
    });
    token
}

/// Metric ids carry their type in the two low bits, as in Envoy.
const METRIC_TYPE_MASK: u32 = 0x3;

fn define_metric(state: &mut HostState, kind: MetricType, name: String) -> u32 {
    let id = (state.next_metric_seq << 2) | kind as u32;
    state.next_metric_seq = state.next_metric_seq.wrapping_add(1);
    state.metrics.entry(name.clone()).or_insert(Metric {
        kind,
        value: 0,
        samples: Vec::new(),
    });
    state.metric_ids.insert(id, (kind, name));
    id
}

fn metric_mut(state: &mut HostState, id: u32) -> Option<&mut Metric> {
    let (_, name) = state.metric_ids.get(&id)?;
    state.metrics.get_mut(name)
}

fn increment_metric(state: &mut HostState, id: u32, offset: i64) -> Result<(), Status> {
    match MetricType::from_raw(id & METRIC_TYPE_MASK) {
        Some(MetricType::Counter) => {
            let metric = metric_mut(state, id).ok_or(Status::NotFound)?;
            if offset <= 0 {
                return Err(Status::BadArgument);
            }
            metric.value = metric.value.saturating_add(offset.unsigned_abs());
        }
        Some(MetricType::Gauge) => {
            let metric = metric_mut(state, id).ok_or(Status::NotFound)?;
            metric.value = if offset >= 0 {
                metric.value.saturating_add(offset.unsigned_abs())
            } else {
                metric.value.saturating_sub(offset.unsigned_abs())
            };
        }
        Some(MetricType::Histogram) | None => return Err(Status::BadArgument),
    }
    Ok(())
}

fn record_metric(state: &mut HostState, id: u32, value: u64) -> Result<(), Status> {
    let metric = metric_mut(state, id).ok_or(Status::NotFound)?;
    match metric.kind {
        MetricType::Counter => metric.value = metric.value.saturating_add(value),
        MetricType::Gauge => metric.value = value,
        MetricType::Histogram => metric.samples.push(value),
    }
    Ok(())
}

fn get_metric(state: &mut HostState, id: u32) -> Result<u64, Status> {
    match MetricType::from_raw(id & METRIC_TYPE_MASK) {
        Some(MetricType::Counter | MetricType::Gauge) => metric_mut(state, id)
            .map(|m| m.value)
            .ok_or(Status::NotFound),
        Some(MetricType::Histogram) | None => Err(Status::BadArgument),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use wasmtime_wasi::WasiCtxBuilder;

    use super::*;
    use crate::clock::Clock;

    fn state() -> HostState {
        HostState::new(
            WasiCtxBuilder::new().build_p1(),
            Clock::starting_at(UNIX_EPOCH),
        )
    }

    #[test]
    fn shared_data_set_with_a_stale_cas_is_a_mismatch() {
        let mut state = state();
        set_shared_data(&mut state, b"k".to_vec(), b"v1".to_vec(), 0).unwrap();
        let (_, first) = state.shared_data[&b"k"[..]].clone();
        set_shared_data(&mut state, b"k".to_vec(), b"v2".to_vec(), first).unwrap();
        assert_eq!(
            set_shared_data(&mut state, b"k".to_vec(), b"v3".to_vec(), first),
            Err(Status::CasMismatch)
        );
        assert_eq!(state.shared_data[&b"k"[..]].0, b"v2");
        // CAS 0 means "no check".
        set_shared_data(&mut state, b"k".to_vec(), b"v4".to_vec(), 0).unwrap();
        assert_eq!(state.shared_data[&b"k"[..]].0, b"v4");
    }

    #[test]
    fn counters_only_grow_and_gauges_move_both_ways() {
        let mut state = state();
        let counter = define_metric(&mut state, MetricType::Counter, "c".to_owned());
        let gauge = define_metric(&mut state, MetricType::Gauge, "g".to_owned());
        assert_eq!(
            increment_metric(&mut state, counter, 0),
            Err(Status::BadArgument)
        );
        assert_eq!(
            increment_metric(&mut state, counter, -1),
            Err(Status::BadArgument)
        );
        increment_metric(&mut state, counter, 3).unwrap();
        record_metric(&mut state, counter, 2).unwrap();
        assert_eq!(get_metric(&mut state, counter), Ok(5));
        increment_metric(&mut state, gauge, 5).unwrap();
        increment_metric(&mut state, gauge, -2).unwrap();
        assert_eq!(get_metric(&mut state, gauge), Ok(3));
        record_metric(&mut state, gauge, 10).unwrap();
        assert_eq!(get_metric(&mut state, gauge), Ok(10));
    }

    #[test]
    fn histograms_record_samples_but_cannot_be_read_or_incremented() {
        let mut state = state();
        let histogram = define_metric(&mut state, MetricType::Histogram, "h".to_owned());
        record_metric(&mut state, histogram, 7).unwrap();
        record_metric(&mut state, histogram, 9).unwrap();
        assert_eq!(state.metrics["h"].samples, [7, 9]);
        assert_eq!(get_metric(&mut state, histogram), Err(Status::BadArgument));
        assert_eq!(
            increment_metric(&mut state, histogram, 1),
            Err(Status::BadArgument)
        );
    }

    #[test]
    fn unknown_metric_ids_are_not_found() {
        let mut state = state();
        assert_eq!(get_metric(&mut state, 4), Err(Status::NotFound));
        assert_eq!(record_metric(&mut state, 4, 1), Err(Status::NotFound));
    }

    #[test]
    fn http_call_needs_method_path_and_authority() {
        let mut state = state();
        let headers = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect::<Vec<_>>()
        };
        let missing_authority = headers(&[(":method", "GET"), (":path", "/")]);
        assert_eq!(
            http_call(
                &mut state,
                "c".into(),
                missing_authority,
                vec![],
                vec![],
                1000
            ),
            Err(Status::BadArgument)
        );
        let complete = headers(&[(":method", "GET"), (":path", "/"), (":authority", "x")]);
        assert_eq!(
            http_call(&mut state, "c".into(), complete, vec![], vec![], 1000),
            Ok(1)
        );
        assert_eq!(state.pending_http_calls, [1]);
    }

    #[test]
    fn request_maps_vanish_when_the_stream_continues() {
        let mut state = state();
        state.streams.insert(2, StreamState::default());
        state.effective_context = 2;
        let stream = state.effective_stream().unwrap();
        stream.request_headers_available = true;
        assert!(readable_map(&mut state, MapType::RequestHeaders).is_some());
        continue_stream(&mut state, StreamType::Request).unwrap();
        assert!(readable_map(&mut state, MapType::RequestHeaders).is_none());
        assert_eq!(state.streams[&2].continued_request, 1);
    }
}
