//! `sundial-stamp LOG`: the action whose own start `sundial-bench` measures
//! in its exec lateness rows — a binary of the standard library alone, so
//! that its own start-up is small. Reads the wall clock first, then appends
//! `SCHEDULED_MS STARTED_NS` to LOG in one write (the occurrence from
//! `SUNDIAL_SCHEDULED_AT_MS`, which the agent sets).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let started_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let Some(log) = std::env::args_os().nth(1) else {
        eprintln!("usage: sundial-stamp LOG");
        return ExitCode::from(2);
    };
    let at = std::env::var("SUNDIAL_SCHEDULED_AT_MS").unwrap_or_else(|_| "-".into());
    let line = format!("{at} {started_ns}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sundial-stamp: {}: {e}", log.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
