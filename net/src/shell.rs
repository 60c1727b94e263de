//! What the binaries' command lines share: writing to a stdout that may be
//! a closed pipe, waiting for SIGTERM or SIGINT, and the shell completions
//! and manual page every binary prints.

use std::io::Write;

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub fn print_quietly(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Resolves at the first SIGTERM or SIGINT (never, when they cannot be
/// watched: the process is then stopped by a signal's default action).
pub async fn shutdown_signal() {
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

/// The completion script of `cmd` for `shell`, for the binary `bin`.
pub fn completions(shell: clap_complete::Shell, mut cmd: clap::Command, bin: &str) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, bin, &mut out);
    out
}

/// The manual page of `cmd` (roff).
pub fn manpage(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    Ok(out)
}
