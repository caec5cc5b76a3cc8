//! `nex completions`: shell completions.

use clap::{Args, CommandFactory};

/// `nex completions`
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell
    pub shell: clap_complete::Shell,
}

/// Prints shell completions.
pub fn completions(args: CompletionsArgs) {
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "nex", &mut std::io::stdout());
}
