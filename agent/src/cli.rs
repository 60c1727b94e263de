//! The `sundial-agent` command line, as a library function so that other
//! binaries (the simulator) can run the very same entry points.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::exec::ExecPolicy;
use crate::runtime::{self, AgentConfig};
use crate::status;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use sundial_protocol::task::OUTPUT_TAIL_BYTES_MAX;

/// Sundial agent: fires this device's scheduled tasks on time, online or not.
#[derive(Debug, Parser)]
#[command(name = "sundial-agent", version, about)]
struct Cli {
    /// How log lines are written to standard error: text, or one JSON
    /// object per line [default: text, or SUNDIAL_LOG_FORMAT].
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<sundial_net::shell::LogFormat>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Enroll with a coordinator using a join token (from `sundialctl token create`).
    Join {
        /// The coordinator's HOST:PORT, or several (HOST:PORT,HOST:PORT) when
        /// several coordinators share one store [default: the addresses the
        /// token carries].
        #[arg(long, value_name = "HOST:PORT")]
        coordinator: Option<String>,
        /// The join token. It shows in `ps` while joining: prefer --token-file.
        #[arg(
            long,
            value_name = "TOKEN",
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// Read the join token from this file (`-` for standard input).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Directory for the agent's key, certificate and store (created if missing).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A name for this agent, shown to operators.
        #[arg(long)]
        name: Option<String>,
        /// A label for task selectors (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Allow programs matching this glob (repeatable); kept for `run`.
        #[arg(long = "allow-exec", value_name = "PATTERN")]
        allow_exec: Vec<String>,
        /// Environment variables tasks may set besides TZ, LANG, LANGUAGE,
        /// LC_* and TASK_* (glob, repeatable; see `run --help`); kept for `run`.
        #[arg(long = "allow-env", value_name = "NAME")]
        allow_env: Vec<String>,
        /// Run functions (WebAssembly modules tasks carry, sandboxed); kept
        /// for `run` (see `run --help`).
        #[arg(long)]
        allow_wasm: bool,
        /// A directory functions may read and write, under its own path
        /// (repeatable); kept for `run`.
        #[arg(long = "allow-wasm-dir", value_name = "DIR")]
        allow_wasm_dirs: Vec<String>,
    },
    /// Run the agent: fire tasks from the local store until stopped (SIGTERM/SIGINT).
    Run {
        /// A TOML configuration file (see deploy/agent.toml); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Directory holding the agent's store (created if missing).
        #[arg(long, value_name = "DIR", required_unless_present = "config")]
        data_dir: Option<PathBuf>,
        /// Allow programs matching this glob to run (repeatable; `*` matches
        /// any characters). With none, every run is recorded as rejected.
        #[arg(long = "allow-exec", value_name = "PATTERN")]
        allow_exec: Vec<String>,
        /// Environment variables tasks may set (glob, repeatable); TZ, LANG,
        /// LANGUAGE, LC_* and TASK_* are always allowed, anything else is a
        /// rejected run. Names that can make an allowed program run other
        /// code (LD_*, PATH, BASH_ENV, PYTHON*, GIT_*, ...) must be named
        /// exactly; BASH_FUNC_* and non-identifiers never pass.
        #[arg(long = "allow-env", value_name = "NAME")]
        allow_env: Vec<String>,
        /// Runs going at once; an occurrence due while this many run is
        /// recorded as skipped [default: 64].
        #[arg(long, value_name = "N")]
        max_concurrent_runs: Option<usize>,
        /// On SIGTERM, how long running actions may take to finish (their
        /// runs recorded as they end) before they are killed and recorded
        /// interrupted; keep it below systemd's TimeoutStopSec [default: 10s].
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        stop_grace: Option<sundial_protocol::DurationMs>,
        /// Run although nothing joined with this data directory: fire only
        /// the tasks already in its store, with no coordinator (a store
        /// restored by hand, tests). Without it an unenrolled directory is
        /// refused, so that a mistyped path does not make a silent agent.
        #[arg(long)]
        standalone: bool,
        /// Serve the agent's own metrics (/metrics, Prometheus text format;
        /// /healthz) on this TCP address, for a Prometheus on the device,
        /// e.g. 127.0.0.1:9464. No credentials: keep it on loopback.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// The key ring that encrypts the store's tasks and run records at
        /// rest [default: the `sundial-store-key` systemd credential when the
        /// unit passes one (LoadCredentialEncrypted=), else store.key in the
        /// data directory, made at the first start]. Back it up apart from
        /// the store: without it the store cannot be read. `off` keeps a
        /// store that was never encrypted plain (to measure the cost).
        #[arg(long, value_name = "FILE")]
        store_key: Option<PathBuf>,
        #[command(flatten)]
        functions: FunctionFlags,
    },
    /// Run one function (the agent starts this itself, its input on stdin).
    #[command(hide = true)]
    FunctionRun,
    /// Rotate the store key: add a new key to the ring and make it current.
    /// A running agent picks it up within 5 s; new records use it, older
    /// ones stay readable with theirs (keep the old keys in the file).
    RotateKey {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The key ring file [default: as `run` finds it].
        #[arg(long, value_name = "FILE")]
        store_key: Option<PathBuf>,
    },
    /// Print a shell completion script for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `sundial-agent manpage | man -l -`; with
    /// --dir, write a page for every subcommand too (sundial-agent-*.1).
    Manpage {
        /// Write the pages into this directory instead of printing one.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Show the local view: tasks, next fire times, outbox, clock. Works offline.
    Status {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
}

/// The device owner's rules for functions.
#[derive(Debug, clap::Args)]
struct FunctionFlags {
    /// Run functions: WebAssembly modules tasks carry, each in a sandbox
    /// (WASI preview 1: arguments, environment, stdout/stderr, clocks,
    /// randomness; no network, no processes, no files but --allow-wasm-dir)
    /// in a child process at low priority. Off by default: a function is
    /// then a rejected run, as a program not allowed is.
    #[arg(long)]
    allow_wasm: bool,
    /// A directory functions may read and write files in, under its own
    /// path (repeatable); nothing outside it is reachable.
    #[arg(long = "allow-wasm-dir", value_name = "DIR")]
    allow_wasm_dirs: Vec<String>,
    /// The most fuel (about one unit per instruction) a function may ask
    /// for [default: 100000000000].
    #[arg(long, value_name = "N")]
    wasm_fuel_max: Option<u64>,
    /// The most memory a function may ask for, e.g. 64MiB [default: 256MiB].
    #[arg(long, value_name = "SIZE", value_parser = sundial_protocol::wasm::parse_bytes)]
    wasm_memory_max: Option<u64>,
    /// The largest module this device takes, e.g. 4MiB [default: 16MiB].
    #[arg(long, value_name = "SIZE", value_parser = sundial_protocol::wasm::parse_bytes)]
    wasm_module_max: Option<u64>,
}

impl FunctionFlags {
    /// The policy from these flags, the file's keys where a flag is not given.
    fn policy(
        self,
        file: &crate::config::AgentFile,
    ) -> anyhow::Result<crate::exec::FunctionPolicy> {
        let size = |key: &str, v: &Option<String>| -> anyhow::Result<Option<u64>> {
            v.as_deref()
                .map(sundial_protocol::wasm::parse_bytes)
                .transpose()
                .map_err(|e| anyhow::anyhow!("config `{key}`: {e}"))
        };
        let d = crate::exec::FunctionPolicy::default();
        let p = crate::exec::FunctionPolicy {
            allowed: self.allow_wasm || file.allow_wasm.unwrap_or(false),
            dirs: if self.allow_wasm_dirs.is_empty() {
                file.allow_wasm_dirs.clone()
            } else {
                self.allow_wasm_dirs
            },
            fuel_max: self
                .wasm_fuel_max
                .or(file.wasm_fuel_max)
                .unwrap_or(d.fuel_max),
            memory_max: match self.wasm_memory_max {
                Some(m) => m,
                None => size("wasm_memory_max", &file.wasm_memory_max)?.unwrap_or(d.memory_max),
            },
            module_max: match self.wasm_module_max {
                Some(m) => m,
                None => size("wasm_module_max", &file.wasm_module_max)?.unwrap_or(d.module_max),
            },
            runner: d.runner,
        };
        for dir in &p.dirs {
            if !std::path::Path::new(dir).is_absolute() {
                anyhow::bail!("--allow-wasm-dir {dir}: give an absolute path");
            }
        }
        if p.module_max > sundial_protocol::wasm::MODULE_BYTES_LIMIT {
            anyhow::bail!(
                "--wasm-module-max: at most {} bytes",
                sundial_protocol::wasm::MODULE_BYTES_LIMIT
            );
        }
        Ok(p)
    }
}

fn parse_duration(s: &str) -> Result<sundial_protocol::DurationMs, String> {
    sundial_protocol::DurationMs::parse(s).map_err(|e| e.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not a label (expected key=value)")),
    }
}

/// Reads a join token from a file or, for `-`, standard input.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut s)
            .context("reading the join token from standard input")?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the join token from {}", path.display()))?
    };
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("{}: no join token in it", path.display());
    }
    Ok(token.to_owned())
}

fn init_logging(default: &str, format: Option<sundial_net::shell::LogFormat>) {
    sundial_net::shell::init_logging(default, format);
}

use sundial_net::shell::{print_quietly, shutdown_signal};

/// Runs `sundial-agent` with these arguments (the first is the program name).
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
    // A function's runner: nothing else of the agent runs in it.
    if let Cmd::FunctionRun = cli.command {
        return crate::function::runner_main();
    }
    sundial_net::damage::exit_on_store_damage(
        "sundial-agent",
        "Stop the agent, move agent.redb out of the data directory (keep it for inspection), and join again with a new token: the coordinator sends the tasks again; records not yet synced are in the old file only.",
    );
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "sundial-agent: {}",
                sundial_protocol::error_text(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let log_format = cli.log_format;
    match cli.command {
        Cmd::FunctionRun => anyhow::bail!("function-run is started by the agent itself"),
        Cmd::Completions { shell } => Ok(print_quietly(&sundial_net::shell::completions(
            shell,
            <Cli as clap::CommandFactory>::command(),
            "sundial-agent",
        ))?),
        Cmd::Manpage { dir: None } => Ok(print_quietly(&sundial_net::shell::manpage(
            <Cli as clap::CommandFactory>::command(),
        )?)?),
        Cmd::Manpage { dir: Some(dir) } => {
            let n = sundial_net::shell::manpages_to(<Cli as clap::CommandFactory>::command(), &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?;
            Ok(print_quietly(
                format!("wrote {n} manual pages into {}\n", dir.display()).as_bytes(),
            )?)
        }
        Cmd::Run {
            config,
            data_dir,
            allow_exec,
            allow_env,
            max_concurrent_runs,
            stop_grace,
            standalone,
            metrics,
            store_key,
            functions,
        } => {
            let file = match &config {
                Some(path) => crate::config::load(path).map_err(anyhow::Error::msg)?,
                None => crate::config::AgentFile::default(),
            };
            init_logging(
                file.log.as_deref().unwrap_or("info"),
                log_format.or(file.log_format),
            );
            let functions = functions.policy(&file)?;
            let Some(data_dir) = data_dir.or(file.data_dir.clone()) else {
                anyhow::bail!(
                    "no data directory: pass --data-dir or set data_dir in the config file"
                );
            };
            if !standalone && !data_dir.join(crate::session::CERT_FILE).exists() {
                let what = if data_dir.is_dir() {
                    "holds no enrolled agent (no agent.pem)"
                } else {
                    "does not exist"
                };
                anyhow::bail!(
                    "{} {what}: nothing has joined with this directory. Enroll it first:\n  \
                     sundial-agent join --token-file FILE --data-dir {}\n\
                     (the token from `sundialctl token create` on the coordinator's side), or \
                     pass --standalone to fire only the tasks already in its store, without a coordinator",
                    data_dir.display(),
                    data_dir.display()
                );
            }
            let mut exec = ExecPolicy {
                allow: if allow_exec.is_empty() {
                    file.allow_exec.clone()
                } else {
                    allow_exec
                },
                functions,
                allow_env: if allow_env.is_empty() {
                    file.allow_env.clone()
                } else {
                    allow_env
                },
                ..ExecPolicy::default()
            };
            if let Some(b) = file.output_tail_bytes {
                if b > OUTPUT_TAIL_BYTES_MAX {
                    tracing::warn!(
                        configured = b,
                        max = OUTPUT_TAIL_BYTES_MAX,
                        "output_tail_bytes is above the most any agent keeps; using the maximum"
                    );
                }
                exec.tail_bytes_max = b.min(OUTPUT_TAIL_BYTES_MAX);
            }
            let runs_concurrent_max = max_concurrent_runs
                .or(file.max_concurrent_runs)
                .unwrap_or(runtime::RUNS_CONCURRENT_MAX_DEFAULT);
            if runs_concurrent_max == 0 {
                anyhow::bail!("--max-concurrent-runs must be at least 1");
            }
            let stop_grace = match stop_grace {
                Some(d) => d,
                None => match &file.stop_grace {
                    Some(t) => sundial_protocol::DurationMs::parse(t)
                        .map_err(|e| anyhow::anyhow!("config `stop_grace`: {e}"))?,
                    None => {
                        sundial_protocol::DurationMs(runtime::STOP_GRACE_DEFAULT.as_millis() as u64)
                    }
                },
            };
            let coordinators = if file.coordinators.is_empty() {
                Vec::new()
            } else {
                sundial_protocol::token::coordinator_list(&file.coordinators.join(","))
                    .map_err(|e| anyhow::anyhow!("config `coordinators`: {e}"))?
            };
            let config = AgentConfig {
                data_dir,
                exec,
                runs_concurrent_max,
                stop_grace: std::time::Duration::from_millis(stop_grace.as_millis()),
                coordinators,
                metrics: metrics.or(file.metrics),
                store_key: store_key.or(file.store_key),
                start_lead: runtime::StartLead::Ahead,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(runtime::run(config, shutdown_signal()))
                .context("agent stopped")?;
            Ok(())
        }
        Cmd::Join {
            coordinator,
            token,
            token_file,
            data_dir,
            name,
            labels,
            allow_exec,
            allow_env,
            allow_wasm,
            allow_wasm_dirs,
        } => {
            if let Some(why) = sundial_protocol::wire::allowlist_refusal(&allow_exec) {
                anyhow::bail!(why);
            }
            let token = match (token, token_file) {
                (Some(t), _) => t,
                (None, Some(path)) => read_token(&path)?,
                (None, None) => anyhow::bail!("pass --token-file FILE (or - for stdin) or --token"),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let req = crate::enroll::JoinRequest {
                coordinator,
                token,
                name,
                labels,
                allow_exec,
                allow_env,
                allow_wasm,
                allow_wasm_dirs,
            };
            let id = rt
                .block_on(crate::enroll::join(&data_dir, req))
                .map_err(anyhow::Error::msg)?;
            println!("{id}");
            Ok(())
        }
        Cmd::RotateKey {
            data_dir,
            store_key,
        } => {
            let path = sundial_net::at_rest::key_path(&data_dir, store_key.as_deref());
            let (old, new) = runtime::rotate_store_key(&path).map_err(anyhow::Error::msg)?;
            println!(
                "{}: key {new} added and made current (was {old}); a running agent uses it within 5 s; keep the older keys: records written with them stay readable by them",
                path.display()
            );
            Ok(())
        }
        Cmd::Status { data_dir, output } => {
            let s = match (status::read(&data_dir), output) {
                (Ok(s), _) => s,
                (Err(e), Output::Json) => {
                    // Asked for JSON: the failure is JSON too.
                    let why = sundial_protocol::error_text(&e);
                    println!("{}", serde_json::json!({ "error": why }));
                    return Err(e.into());
                }
                (Err(e), Output::Table) => return Err(e.into()),
            };
            match output {
                Output::Table => print!("{}", status::render(&s)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
            }
            Ok(())
        }
    }
}
