//! EchoService: reads `NATS_URL`, registers the NATS micro service `EchoService` v1.0.0 with the
//! endpoint `svc.echo` that replies with the request payload, and drains on SIGINT/SIGTERM/SIGQUIT.
//!
//! Build it statically so it runs in any tier:
//! `cargo build --release -p echoservice --target x86_64-unknown-linux-musl`

use async_nats::service::ServiceExt;
use futures::StreamExt;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
    let nc =
        async_nats::ConnectOptions::new().name("echoservice").retry_on_initial_connect().connect(url.as_str()).await?;
    let service = nc.service_builder().description("Echoes every request back").start("EchoService", "1.0.0").await?;
    let mut echo = service.endpoint("svc.echo").await?;
    println!("EchoService 1.0.0 listening on svc.echo via {url}");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    loop {
        tokio::select! {
            Some(req) = echo.next() => {
                let payload = req.message.payload.clone();
                if let Err(e) = req.respond(Ok(payload)).await {
                    eprintln!("reply failed: {e}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = quit.recv() => break,
        }
    }
    println!("EchoService draining");
    nc.drain().await?;
    Ok(())
}
