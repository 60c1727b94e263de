//! `sundial-coordinator`: creates and runs the coordinator.

fn main() -> std::process::ExitCode {
    sundial_coordinator::coordinator_cli::main_with(std::env::args_os())
}
