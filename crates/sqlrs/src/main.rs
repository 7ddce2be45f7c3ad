//! `sqlrs`: the thin command line over the local Taidon daemon. Parse, call the API, render.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod args;
mod changelog;
mod cli;
mod client;
mod cmd_inputs;
mod commands;
mod complete;
mod daemon;
mod error;
mod inputs;
mod progress;
mod project;
mod remote;
mod render;
mod run;

use crate::args::{Command, Parsed};
use crate::error::Error;

fn main() {
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    let result = match args::parse(std::env::args_os().skip(1)) {
        Err(usage) => Err(Error::Usage(usage)),
        Ok(Parsed::Print(text)) => commands::out(&text).map(|()| 0),
        Ok(Parsed::Cli(cli)) => match cli.command {
            // These need neither a runtime nor a home.
            Command::Version => commands::out(&commands::version()).map(|()| 0),
            Command::Completions(shell) => commands::out(complete::script(shell)).map(|()| 0),
            _ => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Error::Output)
                .and_then(|rt| rt.block_on(commands::execute(*cli))),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(text) = e.report() {
                eprint!("{text}");
            }
            e.exit_code()
        }
    }
}
