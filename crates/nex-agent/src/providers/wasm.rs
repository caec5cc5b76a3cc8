//! WebAssembly functions: a WASI preview-1 command module compiled once at deploy and
//! instantiated per call from a pre-linked `InstancePre`. argv = `["nexfunction", <subject>]`, the
//! payload on stdin, all of stdout is the reply. Every call has an epoch deadline and a memory cap,
//! and no file system or network.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{
    Caller, Config, Engine, Extern, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig,
    Store,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use nex_api::agent::{AgentDeployRequest, FunctionLimits};

use super::{failed_to, DeployError};

/// Epoch tick used for call deadlines.
const TICK: Duration = Duration::from_millis(5);
/// Most output a call may write.
const MAX_OUTPUT: usize = 16 * 1024 * 1024;
/// Calls relayed by the node that may run at once (more wait for a slot).
pub const SLOTS: u32 = 64;
/// Instance slots: the relayed calls' plus one per trigger worker thread.
const POOL: u32 = SLOTS + crate::triggers::MAX_WORKERS as u32;

struct CallState {
    wasi: WasiP1Ctx,
    limits: CallLimits,
    host: super::js::HostCall,
}

/// One call's memory cap; remembers that it refused to grow, so the failure is known by what
/// happened rather than by an error's wording.
struct CallLimits {
    memory_bytes: usize,
    refused: bool,
}

impl wasmtime::ResourceLimiter for CallLimits {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.refused = true;
            // An error (rather than `false`) traps the call at once.
            wasmtime::bail!("memory limit reached");
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Most table elements one instance may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// A compiled, linked module.
pub struct Wasm {
    /// One permit per instance slot; a call holds one while it runs.
    pub slots: tokio::sync::Semaphore,
    engine: Engine,
    pre: InstancePre<CallState>,
    env: Vec<(String, String)>,
    limits: FunctionLimits,
    host: super::js::HostCall,
}

/// What one call produced.
pub struct CallOutput {
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl Wasm {
    /// Compiles and links the module at `path`.
    pub fn load(path: &Path, req: &AgentDeployRequest, host: super::js::HostCall) -> Result<Wasm, DeployError> {
        let bytes = std::fs::read(path).map_err(failed_to("read module"))?;
        let limits = req.function_limits.clone().unwrap_or_default();
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        // Every call instantiates the module anew, as in Nex. A pool of pre-reserved
        // instance slots makes that cheap: no mmap/munmap per call (which also serialises
        // concurrent calls on the address-space lock), and the module's memory image is mapped
        // copy-on-write into a slot that is reset, not rebuilt. The first MiBs of a slot stay
        // resident and are reset on reuse rather than faulted in again (a Rust command's stack
        // and data live there); where the kernel has PAGEMAP_SCAN (Linux ≥ 6.7) only the pages
        // the call dirtied are reset. Per echo call here: 23 µs → 19 (resident) → 9 (scan).
        // Each memory reserves only its cap (bounds-checked code, no 4 GiB reservation per
        // slot: measured no slower).
        let mem = (limits.memory_mib as usize) * 1024 * 1024;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(POOL)
            .total_memories(POOL)
            .total_tables(POOL)
            .total_component_instances(0)
            .max_memory_size(mem)
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        cfg.memory_reservation(mem as u64).memory_guard_size(2 << 20).memory_reservation_for_growth(0);
        let engine = Engine::new(&cfg).map_err(failed_to("create the wasm engine"))?;
        let module = Module::new(&engine, &bytes).map_err(failed_to("compile module"))?;
        let mut linker: Linker<CallState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut CallState| &mut s.wasi)
            .map_err(failed_to("link WASI"))?;
        linker.func_wrap("nex_host", "call", host_call).map_err(failed_to("link nex_host"))?;
        let pre =
            linker.instantiate_pre(&module).map_err(failed_to("link module (a WASI preview-1 command is required)"))?;
        // One ticker per engine drives every call's deadline.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(e) = weak.upgrade() {
                    e.increment_epoch();
                    drop(e);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(failed_to("start the epoch ticker"))?;
        Ok(Wasm {
            slots: tokio::sync::Semaphore::new(SLOTS as usize),
            engine,
            pre,
            env: req.environment.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            limits,
            host,
        })
    }

    /// Runs one call (blocking; run it off the async runtime).
    pub fn call(self: &Arc<Self>, subject: &str, payload: &[u8]) -> Result<CallOutput, super::CallError> {
        let stdout = MemoryOutputPipe::new(MAX_OUTPUT);
        let stderr = MemoryOutputPipe::new(1024 * 1024);
        let wasi = WasiCtxBuilder::new()
            .args(&["nexfunction", subject])
            .envs(&self.env)
            .stdin(MemoryInputPipe::new(payload.to_vec()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build_p1();
        let limits = CallLimits { memory_bytes: (self.limits.memory_mib as usize) * 1024 * 1024, refused: false };
        let mut store = Store::new(&self.engine, CallState { wasi, limits, host: self.host.clone() });
        store.limiter(|s| &mut s.limits);
        let ticks = (self.limits.timeout_ms / TICK.as_millis() as u64).max(1);
        store.set_epoch_deadline(ticks);
        let started = Instant::now();
        let outcome = self.pre.instantiate(&mut store).and_then(|instance| {
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call(&mut store, ())
        });
        let out = || CallOutput { stdout: stdout.contents().to_vec(), stderr: stderr.contents().to_vec() };
        match outcome {
            Ok(()) => Ok(out()),
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    return if exit.0 == 0 { Ok(out()) } else { Err(super::CallError::Exited(exit.0)) };
                }
                if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
                    let ms = (started.elapsed().as_millis() as u64).max(self.limits.timeout_ms);
                    return Err(super::CallError::TimedOut { engine: "wasm", ms });
                }
                if store.data().limits.refused {
                    return Err(super::CallError::MemoryLimit { engine: "wasm", mib: self.limits.memory_mib });
                }
                Err(super::CallError::Failed(format!("wasm function failed: {}", format!("{e:#}").replace('\n', " "))))
            }
        }
    }
}

/// `nex_host.call(service, method, arg, body, out) -> (code << 32) | len`: the host services for
/// WebAssembly (`docs/protocol.md`). Each argument is a (pointer, length) pair in linear memory;
/// `arg` is the key, subject, object name or URL. The answer (or the error message) is copied into
/// `out` up to `out_cap` bytes; `len` is its full length, so a caller can retry with more room.
#[allow(clippy::too_many_arguments)]
fn host_call(
    mut caller: Caller<'_, CallState>,
    svc_ptr: i32,
    svc_len: i32,
    method_ptr: i32,
    method_len: i32,
    arg_ptr: i32,
    arg_len: i32,
    body_ptr: i32,
    body_len: i32,
    out_ptr: i32,
    out_cap: i32,
) -> wasmtime::Result<i64> {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return Err(wasmtime::Error::msg("nex_host.call needs an exported memory"));
    };
    let read = |caller: &Caller<'_, CallState>, ptr: i32, len: i32| -> wasmtime::Result<Vec<u8>> {
        let data = mem.data(caller);
        let (p, l) = (ptr as u32 as usize, len as u32 as usize);
        data.get(p..p.saturating_add(l))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| wasmtime::Error::msg("nex_host.call: argument out of bounds"))
    };
    let service = String::from_utf8_lossy(&read(&caller, svc_ptr, svc_len)?).to_string();
    let method = String::from_utf8_lossy(&read(&caller, method_ptr, method_len)?).to_string();
    let arg = String::from_utf8_lossy(&read(&caller, arg_ptr, arg_len)?).to_string();
    let body = read(&caller, body_ptr, body_len)?;
    let header = match service.as_str() {
        "kv" => "x-keyvalue-key",
        "messaging" => "x-subject",
        "objectstore" => "x-object-name",
        _ => "x-http-url",
    };
    let mut headers = std::collections::HashMap::new();
    if !arg.is_empty() {
        headers.insert(header.to_string(), arg);
    }
    let host = caller.data().host.clone();
    let (code, msg, out) = host(&service, &method, headers, body);
    let answer = if code == 200 { out } else { msg.into_bytes() };
    let n = answer.len().min(out_cap.max(0) as usize);
    mem.write(&mut caller, out_ptr as u32 as usize, &answer[..n])
        .map_err(|_| wasmtime::Error::msg("nex_host.call: output buffer out of bounds"))?;
    Ok(((code as i64) << 32) | answer.len() as i64)
}
