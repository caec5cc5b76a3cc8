//! A WASI preview-1 command for nex: reads the payload from stdin, appends the
//! trigger subject (argv[1]) and writes the result to stdout, which becomes the reply.
//!
//! `cargo build --release -p echofunction --target wasm32-wasip1`
//! `nex devrun target/wasm32-wasip1/release/echofunction.wasm --trigger_subject 'echo.>'`

use std::io::{Read, Write};

fn main() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("stdin");
    let subject = std::env::args().nth(1).unwrap_or_default();
    input.extend_from_slice(subject.as_bytes());
    std::io::stdout().write_all(&input).expect("stdout");
}
