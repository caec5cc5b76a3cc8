//! Where the process's own log lines go (`--logger std,file,nats`).
//!
//! `std` writes to stderr; `file` appends to `./nex.log` (every line) and `./nex.err` (warnings
//! and errors); `nats` queues formatted lines until `nex node up` has its connection and node id,
//! then publishes them on `$NEX.logs.system.<node>.stdout` (info and below) and `.stderr`
//! (warnings and errors). The queue is bounded: a line that does not fit is dropped and counted,
//! so a slow or absent NATS server never blocks the node.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::cli::GlobalOpts;

/// Lines waiting for the NATS publisher.
const QUEUE: usize = 4096;

/// One formatted line and whether it is a warning or an error.
type Line = (bool, Vec<u8>);

struct NatsQueue {
    tx: mpsc::Sender<Line>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Line>>>,
    dropped: AtomicU64,
}

static NATS: OnceLock<NatsQueue> = OnceLock::new();

/// A `MakeWriter` handing each event's line to the NATS queue.
#[derive(Clone, Copy)]
struct NatsWriter;

/// The writer of one event.
struct NatsLine {
    error: bool,
}

impl Write for NatsLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes each event with one call.
        if let Some(q) = NATS.get() {
            let line = buf.strip_suffix(b"\n").unwrap_or(buf).to_vec();
            if q.tx.try_send((self.error, line)).is_err() {
                q.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for NatsWriter {
    type Writer = NatsLine;

    fn make_writer(&'a self) -> NatsLine {
        NatsLine { error: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> NatsLine {
        NatsLine { error: *meta.level() <= Level::WARN }
    }
}

fn layer<S, W>(g: &GlobalOpts, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let l = tracing_subscriber::fmt::layer().with_writer(writer).with_target(false).with_ansi(ansi);
    if g.logjson {
        l.json().boxed()
    } else {
        l.boxed()
    }
}

fn open(path: &str) -> Result<Arc<std::fs::File>, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Arc::new)
        .map_err(|e| format!("--logger file: cannot open ./{path}: {e}"))
}

/// Installs the global subscriber for `g.loglevel` and `g.logger`.
pub fn init(g: &GlobalOpts) -> Result<(), String> {
    let level = match g.loglevel.as_str() {
        "none" => "off",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},async_nats=warn")));
    let mut layers = Vec::new();
    for sink in &g.logger {
        match sink.as_str() {
            "std" => layers.push(layer(g, std::io::stderr, std::io::IsTerminal::is_terminal(&std::io::stderr()))),
            "file" => {
                layers.push(layer(g, open("nex.log")?, false));
                layers.push(
                    layer(g, open("nex.err")?, false)
                        .with_filter(tracing_subscriber::filter::LevelFilter::WARN)
                        .boxed(),
                );
            }
            "nats" => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let _ = NATS.set(NatsQueue { tx, rx: std::sync::Mutex::new(Some(rx)), dropped: AtomicU64::new(0) });
                layers.push(layer(g, NatsWriter, false));
            }
            other => return Err(format!("unknown --logger {other:?}: use std, file or nats")),
        }
    }
    tracing_subscriber::registry().with(filter).with(layers).init();
    Ok(())
}

/// With `--logger nats`, starts publishing this process's log lines as `node_id`'s.
pub fn publish_on(nc: async_nats::Client, node_id: &str) {
    let Some(q) = NATS.get() else { return };
    let Some(mut rx) = q.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
    let out = nex_api::subjects::control::system_log(node_id, false);
    let err = nex_api::subjects::control::system_log(node_id, true);
    tokio::spawn(async move {
        let mut reported = 0;
        while let Some((error, line)) = rx.recv().await {
            let subject = if error { err.clone() } else { out.clone() };
            let _ = nc.publish(subject, line.into()).await;
            let dropped = NATS.get().map(|q| q.dropped.load(Ordering::Relaxed)).unwrap_or(0);
            if dropped > reported {
                let text = format!("nex: dropped {} log lines (the NATS log queue was full)", dropped - reported);
                reported = dropped;
                let _ = nc.publish(err.clone(), text.into()).await;
            }
        }
    });
}
