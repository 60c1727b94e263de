//! `sundial-bench`: Sundial's benchmark suites, each beside its baselines in
//! the same run. Prints a table per suite and writes them to BENCHMARKS.md.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sundial_tests::bench::{self, Table};
use sundial_tests::harness;

/// Measure Sundial: the timer wheel, firing lateness, store ingest, backlog
/// drain, fleet scale and footprint. Numbers are medians with min–max over
/// repeated runs; targets are reported as met or missed, never asserted.
#[derive(Debug, Parser)]
#[command(name = "sundial-bench", version, about)]
struct Cli {
    /// Suites to run: wheel, lateness, ingest, runlist, drain, fleet, footprint [default: all].
    suites: Vec<String>,
    /// A smoke run: small sizes, few rounds (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Where to write the Markdown report [default: BENCHMARKS.md, or nothing with --quick].
    #[arg(long, value_name = "FILE")]
    out: Option<std::path::PathBuf>,
}

/// Said first by a build without optimizations (debug assertions on).
const UNOPTIMIZED: &str =
    "An unoptimized build (debug assertions on): a smoke run that every suite \
     still runs; its numbers are not comparable with a release build's (BENCHMARKS.md).";

const SUITES: [&str; 10] = [
    "wheel",
    "lateness",
    "ingest",
    "runlist",
    "stores",
    "drain",
    "failover",
    "fleet",
    "functions",
    "footprint",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(code) = harness::run_as_part(&args) {
        return code;
    }
    let cli = Cli::parse();
    let suites: Vec<String> = if cli.suites.is_empty() {
        SUITES.iter().map(|s| s.to_string()).collect()
    } else {
        cli.suites.clone()
    };
    for s in &suites {
        if !SUITES.contains(&s.as_str()) {
            eprintln!(
                "sundial-bench: unknown suite `{s}` (known: {})",
                SUITES.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sundial-bench: cannot find its own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sundial-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let machine = bench::machine();
    println!(
        "sundial-bench{} on {machine}",
        if cli.quick { " --quick" } else { "" }
    );
    if cfg!(debug_assertions) {
        // CI's smoke run uses the binary its tests built.
        println!("{UNOPTIMIZED}");
    }
    let started = std::time::Instant::now();
    let mut tables: Vec<Table> = Vec::new();
    for s in &suites {
        eprintln!("[{:6.1}s] running {s}…", started.elapsed().as_secs_f64());
        let t = match s.as_str() {
            "wheel" => bench::wheel(cli.quick),
            "lateness" => bench::lateness(cli.quick, &exe),
            "ingest" => bench::ingest(cli.quick),
            "runlist" => bench::runlist(cli.quick),
            "stores" => bench::stores(cli.quick),
            "drain" => rt.block_on(bench::drain(cli.quick, &exe)),
            "failover" => rt.block_on(bench::failover(cli.quick, &exe)),
            "fleet" => rt.block_on(bench::fleet(cli.quick, &exe)),
            "functions" => bench::functions(cli.quick, &exe),
            _ => bench::footprint(cli.quick, &exe),
        };
        println!("\n{}", t.markdown());
        let _ = std::io::stdout().flush();
        tables.push(t);
    }
    let took = started.elapsed().as_secs_f64();
    println!("all suites took {took:.0} s");
    let out = cli
        .out
        .clone()
        .or_else(|| (!cli.quick).then(bench::report_path));
    if let Some(path) = out {
        let mut md = format!(
            "# Sundial benchmarks\n\n{}Machine: {machine}.\n\nProduced by `cargo run --release -p sundial-tests --bin sundial-bench{}{}` \
             in {took:.0} s. Medians with min–max over repeated runs; baselines measured in the same run.\n\n",
            if cfg!(debug_assertions) { format!("{UNOPTIMIZED}\n\n") } else { String::new() },
            if cli.quick { " -- --quick" } else { "" },
            if cli.suites.is_empty() { String::new() } else { format!(" -- {}", cli.suites.join(" ")) },
        );
        for t in &tables {
            md.push_str(&t.markdown());
            md.push('\n');
        }
        if let Err(e) = std::fs::write(&path, md) {
            eprintln!("sundial-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
