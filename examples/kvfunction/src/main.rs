//! A WebAssembly function that uses nex's host services through the `nex_host` import module.
//!
//! ABI (one import): `nex_host.call(service, method, arg, body, out) -> i64` where each argument is
//! a (pointer, length) pair of i32 in linear memory, `arg` is the key / subject / object name / URL,
//! and the answer (or the error message) is copied to `out`. The result packs `code << 32 | len`:
//! code 200 means success, `len` is the answer's full length.
//!
//! It replies with the previous payload it saw (`previous=…`) and stores the current one under
//! key `last` of the workload's key/value bucket.
//!
//! `cargo build --release -p kvfunction --target wasm32-wasip1`

use std::io::{Read, Write};

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "nex_host")]
extern "C" {
    #[link_name = "call"]
    fn nex_host_call(
        svc: *const u8,
        svc_len: usize,
        method: *const u8,
        method_len: usize,
        arg: *const u8,
        arg_len: usize,
        body: *const u8,
        body_len: usize,
        out: *mut u8,
        out_cap: usize,
    ) -> i64;
}

/// Calls a host service; `Ok(answer)` on code 200, else `Err((code, message))`.
fn host(service: &str, method: &str, arg: &str, body: &[u8]) -> Result<Vec<u8>, (i64, String)> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut out = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: every pointer/length pair describes a live buffer of this function.
            let r = unsafe {
                nex_host_call(
                    service.as_ptr(),
                    service.len(),
                    method.as_ptr(),
                    method.len(),
                    arg.as_ptr(),
                    arg.len(),
                    body.as_ptr(),
                    body.len(),
                    out.as_mut_ptr(),
                    out.len(),
                )
            };
            let (code, len) = (r >> 32, (r & 0xffff_ffff) as usize);
            if len > out.len() {
                out.resize(len, 0);
                continue;
            }
            out.truncate(len);
            return if code == 200 { Ok(out) } else { Err((code, String::from_utf8_lossy(&out).into_owned())) };
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (service, method, arg, body);
        Err((501, "nex_host is only available inside nex".into()))
    }
}

fn main() {
    let mut payload = Vec::new();
    std::io::stdin().read_to_end(&mut payload).expect("stdin");
    let previous = match host("kv", "get", "last", &[]) {
        Ok(v) => String::from_utf8_lossy(&v).into_owned(),
        Err(_) => "none".into(),
    };
    if let Err((code, msg)) = host("kv", "set", "last", &payload) {
        eprintln!("kv set failed ({code}): {msg}");
        std::process::exit(1);
    }
    std::io::stdout().write_all(format!("previous={previous}").as_bytes()).expect("stdout");
}
