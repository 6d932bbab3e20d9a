//! Compiled filters: one shared wasmtime engine, modules compiled once per file and linked
//! once (an [`InstancePre`]), so each host only instantiates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use wasmtime::{Cache, CacheConfig, Config, Engine, InstancePre, Linker, Module};

use crate::error::{Result, WasmHostError};
use crate::imports;
use crate::state::HostState;
use crate::workspace_wasm;

/// A proxy-wasm filter compiled and linked against this host, ready to instantiate.
///
/// Cheap to clone. [`FilterModule::load`] caches by path (and the file's modification time
/// and size, so a rebuilt `.wasm` is recompiled), so hundreds of hosts share one compilation.
///
/// ```no_run
/// use proxy_wasm_host::FilterModule;
///
/// let module = FilterModule::load("target/wasm32-wasip1/wasm-release/my_filter.wasm")?;
/// assert!(module.unsupported_imports().is_empty(), "filter needs {:?}", module.unsupported_imports());
/// # Ok::<(), proxy_wasm_host::WasmHostError>(())
/// ```
#[derive(Clone)]
pub struct FilterModule {
    inner: Arc<Compiled>,
}

struct Compiled {
    name: String,
    module: Module,
    pre: InstancePre<HostState>,
    unsupported: Vec<String>,
}

impl std::fmt::Debug for FilterModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterModule")
            .field("name", &self.inner.name)
            .field("unsupported_imports", &self.inner.unsupported)
            .finish_non_exhaustive()
    }
}

/// The engine every module and store of this process uses (modules are tied to an engine).
///
/// Compiled code is also cached on disk (wasmtime's own cache, keyed by module bytes and
/// compiler settings; see `compiled_code_cache_dir`), so a fresh process skips Cranelift for
/// an unchanged `.wasm`. Without a usable cache directory it simply compiles.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        if let Some(directory) = workspace_wasm::compiled_code_cache_dir() {
            let mut cache = CacheConfig::new();
            cache.with_directory(directory);
            if let Ok(cache) = Cache::new(cache) {
                config.cache(Some(cache));
            }
        }
        Engine::new(&config).unwrap_or_else(|_| Engine::default())
    })
}

type CacheKey = (PathBuf, Option<SystemTime>, u64);

fn cache() -> &'static Mutex<HashMap<PathBuf, (CacheKey, FilterModule)>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, (CacheKey, FilterModule)>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

impl FilterModule {
    /// Loads, compiles and links the `.wasm` at `path`, or returns the cached compilation.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|source| WasmHostError::Read {
            path: path.to_owned(),
            source,
        })?;
        let key: CacheKey = (path.to_owned(), metadata.modified().ok(), metadata.len());
        // A poisoned lock only means another test panicked while holding it; the map is intact.
        let cached = cache()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(path)
            .filter(|(k, _)| *k == key)
            .map(|(_, module)| module.clone());
        if let Some(module) = cached {
            return Ok(module);
        }
        let bytes = std::fs::read(path).map_err(|source| WasmHostError::Read {
            path: path.to_owned(),
            source,
        })?;
        let module = Self::compile(&bytes, path.display().to_string())?;
        cache()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(path.to_owned(), (key, module.clone()));
        Ok(module)
    }

    /// Compiles a module from bytes (binary wasm, or the text format), without caching.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::compile(bytes, "<bytes>".to_owned())
    }

    fn compile(bytes: &[u8], name: String) -> Result<Self> {
        let module = Module::new(engine(), bytes).map_err(|e| WasmHostError::Compile {
            what: name.clone(),
            message: format!("{e:#}"),
        })?;
        if module.get_export("proxy_abi_version_0_2_1").is_none() {
            let found = module
                .exports()
                .map(|e| e.name())
                .filter(|n| n.starts_with("proxy_abi_version_"))
                .map(str::to_owned)
                .collect();
            return Err(WasmHostError::AbiVersion { found });
        }
        let instantiate = |e: wasmtime::Error| WasmHostError::Instantiate(format!("{e:#}"));
        let mut linker: Linker<HostState> = Linker::new(engine());
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut HostState| &mut state.wasi)
            .map_err(instantiate)?;
        imports::add_proxy_calls(&mut linker).map_err(instantiate)?;
        let unsupported = imports::link_unsupported(&mut linker, &module);
        let pre = linker.instantiate_pre(&module).map_err(instantiate)?;
        Ok(Self {
            inner: Arc::new(Compiled {
                name,
                module,
                pre,
                unsupported,
            }),
        })
    }

    /// Imports of the module this host does not implement (linked to an error-returning
    /// stand-in). A filter that works in Envoy should not need any of them.
    pub fn unsupported_imports(&self) -> &[String] {
        &self.inner.unsupported
    }

    /// Where the module came from: its path, or `<bytes>`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether the module exports `name`.
    pub fn exports(&self, name: &str) -> bool {
        self.inner.module.get_export(name).is_some()
    }

    pub(crate) fn engine(&self) -> &Engine {
        engine()
    }

    pub(crate) fn instance_pre(&self) -> &InstancePre<HostState> {
        &self.inner.pre
    }
}
