//! `sundial-agent`: the agent binary.

fn main() -> std::process::ExitCode {
    sundial_agent::cli::main_with(std::env::args_os())
}
