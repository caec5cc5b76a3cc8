//! `nex`: the command line of the NATS execution engine, and the node daemon (`nex node up`).

mod cli;
mod commands;
mod connect;
mod context;
mod logging;
mod output;

use std::process::ExitCode;

use cli::{Cli, Command, NodeCommand};

/// The command line, with a `nats` context applied to the connection options.
fn parse() -> anyhow::Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    // `v<version> [<commit>] | Built-on: <date>`, without clap's leading program name.
    if matches!(std::env::args().nth(1).as_deref(), Some("--version" | "-V")) {
        println!("{}", nex_api::BUILD);
        std::process::exit(0);
    }
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let server_given = matches!(
        matches.value_source("server"),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    );
    cli.global.apply_context(server_given)?;
    Ok(cli)
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{} {e:#}", output::paint("error:", "1;31"));
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = logging::init(&cli.global) {
        eprintln!("{} {e}", output::paint("error:", "1;31"));
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(dispatch(cli));
    // Do not wait for idle blocking threads (DNS lookups, file I/O) to time out.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} {e:#}", output::paint("error:", "1;31"));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let command = match cli.command {
        Command::Node(NodeCommand::Up(args)) => return commands::node::up(&g, args).await,
        Command::Node(NodeCommand::Preflight(args)) => return commands::preflight::preflight(args),
        Command::Node(NodeCommand::FleetXkey(args)) => return commands::node::fleet_xkey(args),
        Command::Up(args) => return commands::up::up(&g, args).await,
        Command::Bench(args) => return commands::bench::bench(&g, args).await,
        Command::Rootfs(args) => return commands::rootfs::rootfs(args),
        Command::Completions(args) => {
            commands::completions::completions(args);
            return Ok(());
        }
        other => other,
    };
    let nc = connect::connect(&g, "nex", false).await?;
    let client = nex_client::ControlClient::new(nc.clone(), g.timeout, &g.namespace);
    let res = match command {
        Command::Node(NodeCommand::Ls(a)) => commands::node::ls(&client, a).await,
        Command::Node(NodeCommand::Info(a)) => commands::node::info(&client, a).await,
        Command::Node(NodeCommand::Probe(a)) => commands::node::probe(&client, a).await,
        Command::Logs(a) => commands::monitor::logs(&nc, client.namespace(), a).await,
        Command::Events(a) => commands::monitor::events(&nc, client.namespace(), a).await,
        Command::Lameduck(a) => commands::lameduck::lameduck(&client, a).await,
        Command::Call(a) => commands::call::call(&nc, g.timeout, a).await,
        Command::Ui(a) => commands::ui::ui(&nc, &client, g.timeout, a).await,
        Command::Node(NodeCommand::Up(_) | NodeCommand::Preflight(_) | NodeCommand::FleetXkey(_))
        | Command::Up(_)
        | Command::Bench(_)
        | Command::Rootfs(_)
        | Command::Completions(_) => {
            unreachable!("handled above")
        }
        Command::Run(a) => commands::run::run(&g, &client, a).await,
        Command::Plan(a) => commands::deployments::plan(&g, &nc, a).await,
        Command::Apply(a) => commands::deployments::apply(&g, &nc, a).await,
        Command::Deployments(c) => commands::deployments::deployments(&g, &nc, c).await,
        Command::Devrun(a) => commands::devrun::devrun(&g, &client, a).await,
        Command::Stop(a) => commands::run::stop(&client, a).await,
    };
    let _ = nc.flush().await;
    res
}
