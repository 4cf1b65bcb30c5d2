//! `pd-engine`: run the engine from the command line (see `pd-engine --help`).

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod cli;
mod decode;
mod procs;
mod proto;
mod report;
mod stats;
mod worker;

fn main() -> std::process::ExitCode {
    use clap::Parser;
    match cli::run(cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pd-engine: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
