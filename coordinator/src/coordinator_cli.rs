//! The `sundial-coordinator` command line, as a library function so that
//! other binaries (the simulator) can run the very same entry points.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{self, Server, PORT_DEFAULT};
use anyhow::Context;
use clap::{Parser, Subcommand};

/// Sundial coordinator: assigns tasks to agents and stores their runs.
#[derive(Debug, Parser)]
#[command(name = "sundial-coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a coordinator: CA, server certificate, store, and admin
    /// credentials (DIR/admin.creds, whose path is printed).
    Init {
        /// Directory for the coordinator's data (created if missing).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The HOST:PORT agents and sundialctl will dial.
        #[arg(long, value_name = "HOST:PORT")]
        advertise: String,
        /// The name in the coordinator's certificate, carried in join tokens;
        /// agents verify the coordinator by it, whatever address they dial.
        #[arg(long, value_name = "NAME", default_value = sundial_protocol::tls::SERVER_NAME_DEFAULT)]
        server_name: String,
    },
    /// Serve agents and admins until SIGTERM/SIGINT.
    Serve {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long, value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], PORT_DEFAULT)))]
        listen: SocketAddr,
    },
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// Runs `sundial-coordinator` with these arguments (the first is the program name).
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SUNDIAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sundial-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Init {
            data_dir,
            advertise,
            server_name,
        } => {
            if !advertise.contains(':') {
                anyhow::bail!(
                    "--advertise `{advertise}`: expected HOST:PORT, e.g. 127.0.0.1:{PORT_DEFAULT}"
                );
            }
            let creds = server::init(&data_dir, &advertise, &server_name)?;
            println!("{}", creds.display());
            Ok(())
        }
        Cmd::Serve { data_dir, listen } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let server = Server::bind(&data_dir, listen)?;
                server.run(shutdown_signal()).await;
                Ok::<_, anyhow::Error>(())
            })
        }
    }
}
