//! `sundialctl`: Sundial's admin CLI.

use std::process::ExitCode;

use chrono::TimeZone;
use clap::{Parser, Subcommand};
use sundial_coordinator::cli::{self, Output, ScheduleArgs};
use sundial_protocol::Timestamp;

/// Sundial admin CLI.
#[derive(Debug, Parser)]
#[command(name = "sundialctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Work with schedules (no coordinator needed).
    #[command(subcommand)]
    Schedule(ScheduleCmd),
}

#[derive(Debug, Subcommand)]
enum ScheduleCmd {
    /// Print the next occurrences of a schedule, as the agents will fire them.
    ///
    /// Example: sundialctl schedule next --cron '30 2 * * *' --tz America/New_York --count 3
    Next {
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// List occurrences strictly after this instant (RFC 3339 or `now`).
        #[arg(long, value_name = "T", value_parser = cli::parse_instant)]
        from: Option<Timestamp>,
        /// How many occurrences to print.
        #[arg(long, value_name = "N", default_value_t = 5)]
        count: usize,
        /// Output format: table (with local times for cron) or json (an array of strings).
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sundialctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Schedule(ScheduleCmd::Next {
            schedule,
            from,
            count,
            output,
        }) => {
            let now = cli::now();
            let sched = schedule.to_schedule(now).map_err(anyhow::Error::msg)?;
            let from = from.unwrap_or(now);
            let next = cli::next_occurrences(&sched, from, count);
            match output {
                Output::Json => {
                    let texts: Vec<String> = next.iter().map(ToString::to_string).collect();
                    println!("{}", serde_json::to_string(&texts)?);
                }
                Output::Table => {
                    if next.is_empty() {
                        println!("no occurrences after {from}");
                    }
                    let zone = schedule.zone();
                    for t in next {
                        match zone {
                            Some(tz) if tz != chrono_tz::UTC => {
                                let local = tz.from_utc_datetime(&t.to_naive_utc());
                                println!("{t}  {}", local.format("%Y-%m-%d %H:%M:%S %Z"));
                            }
                            _ => println!("{t}"),
                        }
                    }
                }
            }
            Ok(())
        }
    }
}
