//! `vista3d`: parses the command line and dispatches to the library (see `cli/`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    vista3d::runtime::enable_huge_page_tensors();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    vista3d::runtime::init_cuda();
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
