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

/// Histogram buckets of run start lateness, seconds: 1 ms to a minute
/// (firing is meant to be on time to the millisecond). The agent's and
/// the coordinator's metrics use the same, so they compare.
pub const LATENESS_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Histogram buckets of run duration, seconds: 10 ms to an hour.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Writes a manual page for `cmd` and one for each of its subcommands,
/// at any depth (`sundialctl.1`, `sundialctl-task.1`,
/// `sundialctl-task-create.1`, …), into `dir` (made if missing); the
/// number of pages written.
pub fn manpages_to(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<usize> {
    fn count(cmd: &clap::Command) -> usize {
        1 + cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(count)
            .sum::<usize>()
    }
    std::fs::create_dir_all(dir)?;
    let mut built = cmd.clone().disable_help_subcommand(true);
    built.build();
    clap_mangen::generate_to(cmd, dir)?;
    Ok(count(&built))
}

/// How the daemons write their log lines (`--log-format`, or
/// `SUNDIAL_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event, for people (and journald).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`),
    /// for log shippers.
    Json,
}

/// Starts logging to standard error with `filter` unless `SUNDIAL_LOG`
/// says otherwise, in `format` unless `SUNDIAL_LOG_FORMAT` (text, json)
/// says otherwise.
pub fn init_logging(filter: &str, format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SUNDIAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let format = format.unwrap_or_else(|| match std::env::var("SUNDIAL_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// OpenMetrics text (as `prometheus-client` writes it) in the classic
/// Prometheus text format (0.0.4), for clients that do not ask for
/// OpenMetrics (`curl`, `promtool check metrics`): counters' HELP and TYPE
/// name their `_total` series; no UNIT lines, no EOF.
pub fn openmetrics_to_classic(open: &str) -> String {
    let lines: Vec<&str> = open.lines().collect();
    let counters: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in lines {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
