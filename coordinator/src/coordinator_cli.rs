//! The `sundial-coordinator` command line, as a library function so that
//! other binaries (the simulator) can run the very same entry points.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{self, Limits, Server, PORT_DEFAULT};
use anyhow::Context;
use clap::{Parser, Subcommand};
use sundial_protocol::DurationMs;

/// Sundial coordinator: assigns tasks to agents and stores their runs.
#[derive(Debug, Parser)]
#[command(name = "sundial-coordinator", version, about)]
struct Cli {
    /// How log lines are written to standard error: text, or one JSON
    /// object per line [default: text, or SUNDIAL_LOG_FORMAT].
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<sundial_net::shell::LogFormat>,
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per run: the size of `serve`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a coordinator: CA, server certificate, store, and admin
    /// credentials (DIR/admin.creds, whose path is printed).
    Init {
        /// Directory for the coordinator's data (created if missing).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The HOST:PORT agents and sundialctl will dial; with several
        /// coordinators on one PostgreSQL, all of them: HOST:PORT,HOST:PORT
        /// (join tokens carry the list).
        #[arg(long, value_name = "HOST:PORT")]
        advertise: String,
        /// The name in the coordinator's certificate, carried in join tokens;
        /// agents verify the coordinator by it, whatever address they dial.
        #[arg(long, value_name = "NAME", default_value = sundial_net::tls::SERVER_NAME_DEFAULT)]
        server_name: String,
        /// Replace a CA already in DIR (and delete its store). Every agent
        /// enrolled with the old CA is locked out and must join again.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Serve agents and admins until SIGTERM/SIGINT.
    Serve {
        /// A TOML configuration file (see deploy/coordinator.toml); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long, value_name = "DIR", required_unless_present = "config")]
        data_dir: Option<PathBuf>,
        /// UDP address to listen on [default: 0.0.0.0:7447].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on
        /// this TCP address, e.g. 127.0.0.1:9447 [default: not served]. It
        /// takes no credentials: keep it on loopback or a monitoring network.
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
        /// Serve the same (and the dashboard, from anywhere) over TLS on
        /// this TCP address, to clients showing an admin credential (a
        /// viewer's is enough: sundialctl admin create dash --role viewer;
        /// sundialctl --creds dash.creds admin pem --out DIR for a browser
        /// or curl) [default: not served].
        #[arg(long, value_name = "ADDR")]
        https: Option<SocketAddr>,
        /// Tasks with metrics series of their own; runs of further tasks
        /// are counted under task="other" [default: 1000].
        #[arg(long, value_name = "N")]
        metrics_task_series: Option<usize>,
        /// POST a JSON notification to this http:// URL for every run that
        /// does not succeed and every agent offline too long; queued on
        /// disk and retried until the receiver answers 2xx.
        #[arg(long, value_name = "URL")]
        notify: Option<String>,
        /// A file holding the secret that signs notifications
        /// (X-Sundial-Signature: sha256=HMAC-SHA256 of the body, in hex).
        #[arg(long, value_name = "FILE")]
        notify_secret_file: Option<PathBuf>,
        /// Notify agents offline (no session, not seen) longer than this;
        /// 0 never [default: 10m].
        #[arg(long, value_name = "DUR", value_parser = crate::cli::parse_duration)]
        notify_offline_after: Option<DurationMs>,
        /// The key ring that encrypts the store's tasks and run records at
        /// rest [default: the `sundial-store-key` systemd credential when the
        /// unit passes one (LoadCredentialEncrypted=), else store.key in the
        /// data directory, made at the first start]. Back it up apart from
        /// the store; every coordinator of one PostgreSQL store needs the same.
        /// `off` keeps a store that was never encrypted plain (to measure
        /// the cost).
        #[arg(long, value_name = "FILE")]
        store_key: Option<PathBuf>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Apply the PostgreSQL store's schema migrations not yet applied (each
    /// once, under a transaction-scoped advisory lock; `serve` does the same
    /// at start) and say which.
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Move a coordinator from its embedded store to PostgreSQL: every agent,
    /// task, token, counter and run record is copied, the counts compared,
    /// and DIR switched to the database (DIR/store.url). Stop the
    /// coordinator first; coordinator.redb stays as it was, as a backup.
    Import {
        /// The coordinator's data directory (holding coordinator.redb).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Rotate the store key: add a new key to the ring and make it current.
    /// A running coordinator picks it up within 5 s; new records use it,
    /// older ones stay readable with theirs (keep the old keys in the
    /// file). Several coordinators on one PostgreSQL: --stage on one, copy
    /// the file to every coordinator, then --activate on each.
    RotateKey {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The key ring file [default: as `serve` finds it].
        #[arg(long, value_name = "FILE")]
        store_key: Option<PathBuf>,
        /// Add the new key for reading only, not yet current.
        #[arg(long, conflicts_with = "activate")]
        stage: bool,
        /// Make the newest (staged) key current.
        #[arg(long)]
        activate: bool,
    },
    /// Print a shell completion script for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `sundial-coordinator manpage | man -l -`; with
    /// --dir, write a page for every subcommand too (sundial-coordinator-*.1).
    Manpage {
        /// Write the pages into this directory instead of printing one.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

use sundial_net::shell::{print_quietly, shutdown_signal};

/// Where the state is kept: the embedded store, or PostgreSQL.
#[derive(Debug, Default, clap::Args)]
struct StoreArgs {
    /// Keep the state in PostgreSQL, shared by several coordinators
    /// (`postgres://USER@HOST/DB` or `host=… dbname=…`); `init` writes it
    /// to DIR/store.url, which `serve` reads by default. Without it: the
    /// embedded store in DIR, for one coordinator.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// A file holding PostgreSQL's password (else SUNDIAL_PG_PASSWORD, or
    /// the URL, where `ps` shows it).
    #[arg(long, value_name = "FILE")]
    store_password_file: Option<PathBuf>,
}

/// The coordinator's limits as flags (each also a key of the config file).
#[derive(Debug, Default, clap::Args)]
struct LimitArgs {
    /// Run records one agent may upload per second; faster uploads are
    /// slowed down, never lost [default: 2000].
    #[arg(long, value_name = "N")]
    upload_runs_per_sec: Option<u32>,
    /// The shortest --every period a task may have [default: 100ms].
    #[arg(long, value_name = "DUR", value_parser = crate::cli::parse_duration)]
    period_min: Option<DurationMs>,
    /// The largest function module operators may upload, e.g. 4MiB
    /// [default: 16MiB; at most 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = sundial_protocol::wasm::parse_bytes)]
    wasm_module_max: Option<u64>,
    /// The shortest first retry delay (--backoff) a task may have [default: 100ms].
    #[arg(long, value_name = "DUR", value_parser = crate::cli::parse_duration)]
    backoff_min: Option<DurationMs>,
    /// Delete runs scheduled longer ago than this (e.g. 30d), checked every
    /// minute [default: keep every run].
    #[arg(long, value_name = "DUR", value_parser = crate::cli::parse_duration)]
    run_retention: Option<DurationMs>,
    /// Delete audit log entries older than this, checked every minute; 0
    /// keeps every entry [default: 730d].
    #[arg(long, value_name = "DUR", value_parser = crate::cli::parse_duration)]
    audit_retention: Option<DurationMs>,
    /// Agents (0.3 and later) report their figures (backlog, clock, tasks,
    /// store size) when they change, at most this often; 1s to 1h [default: 15s].
    #[arg(long, value_name = "DUR", value_parser = crate::cli::parse_duration)]
    agent_report_every: Option<DurationMs>,
    /// Agent sessions served at once; more are refused until some end [default: 10000].
    #[arg(long, value_name = "N")]
    sessions_max: Option<usize>,
    /// Connections one address may have handshaking or enrolling at once;
    /// more are refused until some finish [default: 32]. Raise it when many
    /// agents reach the coordinator through one address at the same moment.
    #[arg(long, value_name = "N")]
    pending_per_address: Option<usize>,
    /// New connections (TLS handshakes) accepted per second; more are
    /// refused at once and agents come back spread out, as the reconnect
    /// policy the coordinator gives them says [default: 250 per core].
    #[arg(long, value_name = "N")]
    handshakes_per_sec: Option<u32>,
}

/// `init` run as root on a data directory that belongs to another user (the
/// packaged layout: /var/lib/sundial-coordinator, owned by `sundial`)
/// would leave root-owned keys the service cannot read: refuse, and say
/// the exact command to run instead.
fn refuse_root_for_others_dir(dir: &std::path::Path, advertise: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let user = user_name(meta.uid()).unwrap_or_else(|| format!("#{}", meta.uid()));
    anyhow::bail!(
        "{} belongs to user {user}, who runs the service; as root, init would leave keys that user cannot read. Run it as that user:\n  runuser -u {user} -- sundial-coordinator init --data-dir {} --advertise {advertise}",
        dir.display(),
        dir.display()
    )
}

/// The name of the user with this uid, from /etc/passwd.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// `coordinator.toml`: every key optional; flags override.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// The HTTP listener (see `--http`).
    pub http: Option<SocketAddr>,
    /// Serve over TLS to admin credentials (see `--https`).
    pub https: Option<SocketAddr>,
    pub metrics_task_series: Option<usize>,
    /// The webhook (see `--notify`).
    pub notify: Option<String>,
    pub notify_secret_file: Option<PathBuf>,
    pub notify_offline_after: Option<String>,
    /// The store key ring file (see `--store-key`).
    pub store_key: Option<PathBuf>,
    pub log: Option<String>,
    /// `text` or `json` (see `--log-format`).
    pub log_format: Option<sundial_net::shell::LogFormat>,
    pub upload_runs_per_sec: Option<u32>,
    pub period_min: Option<String>,
    /// The largest function module operators may upload, e.g. "16MiB".
    pub wasm_module_max: Option<String>,
    pub backoff_min: Option<String>,
    pub run_retention: Option<String>,
    pub audit_retention: Option<String>,
    pub agent_report_every: Option<String>,
    pub sessions_max: Option<usize>,
    pub pending_per_address: Option<usize>,
    pub handshakes_per_sec: Option<u32>,
    /// A PostgreSQL connection string (see `--store`).
    pub store: Option<String>,
    pub store_password_file: Option<PathBuf>,
    /// Connections to PostgreSQL this coordinator keeps [default: 8].
    pub store_pool_size: Option<usize>,
}

/// The store from flags over the file over the data directory's choice.
fn store_choice(flags: &StoreArgs, file: &CoordinatorFile) -> anyhow::Result<server::StoreChoice> {
    let Some(url) = flags.store.clone().or_else(|| file.store.clone()) else {
        if flags.store_password_file.is_some() {
            anyhow::bail!("--store-password-file needs --store (or store.url in the data directory, which `serve` reads with SUNDIAL_PG_PASSWORD)");
        }
        return Ok(server::StoreChoice::FromDataDir);
    };
    if !crate::pg::is_postgres_url(&url) {
        anyhow::bail!(
            "--store `{}`: expected a PostgreSQL connection string (postgres://USER@HOST/DB, or host=… dbname=…); without --store the embedded store in the data directory is used",
            crate::pg::redact(&url)
        );
    }
    let password = match flags
        .store_password_file
        .clone()
        .or_else(|| file.store_password_file.clone())
    {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading the store password from {}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        None => std::env::var(server::PG_PASSWORD_ENV).ok(),
    };
    if crate::pg::redact(&url) != url {
        tracing::warn!("the store's password is in its URL, where `ps` and the data directory show it: prefer --store-password-file or SUNDIAL_PG_PASSWORD");
    }
    Ok(server::StoreChoice::Postgres(crate::pg::PgOptions {
        url,
        password,
        pool_size: file
            .store_pool_size
            .unwrap_or(crate::pg::POOL_SIZE_DEFAULT)
            .clamp(1, 256),
    }))
}

use sundial_protocol::wire::{REPORT_EVERY_MS_MAX, REPORT_EVERY_MS_MIN};

/// The limits from flags over the file over the defaults.
fn limits(flags: &LimitArgs, file: &CoordinatorFile) -> anyhow::Result<Limits> {
    let dur = |key: &str, v: &Option<String>| -> anyhow::Result<Option<DurationMs>> {
        v.as_deref()
            .map(|t| DurationMs::parse(t).map_err(|e| anyhow::anyhow!("config `{key}`: {e}")))
            .transpose()
    };
    let d = server::default_limits();
    let limits = Limits {
        upload_runs_per_sec: flags
            .upload_runs_per_sec
            .or(file.upload_runs_per_sec)
            .unwrap_or(d.upload_runs_per_sec),
        period_min: flags
            .period_min
            .or(dur("period_min", &file.period_min)?)
            .unwrap_or(d.period_min),
        backoff_min: flags
            .backoff_min
            .or(dur("backoff_min", &file.backoff_min)?)
            .unwrap_or(d.backoff_min),
        run_retention: flags
            .run_retention
            .or(dur("run_retention", &file.run_retention)?),
        audit_retention: match flags
            .audit_retention
            .or(dur("audit_retention", &file.audit_retention)?)
        {
            Some(DurationMs(0)) => None,
            Some(keep) => Some(keep),
            None => d.audit_retention,
        },
        sessions_max: flags
            .sessions_max
            .or(file.sessions_max)
            .unwrap_or(d.sessions_max),
        pending_per_address_max: flags
            .pending_per_address
            .or(file.pending_per_address)
            .unwrap_or(d.pending_per_address_max),
        handshakes_per_sec: flags
            .handshakes_per_sec
            .or(file.handshakes_per_sec)
            .unwrap_or(d.handshakes_per_sec),
        agent_report_every: flags
            .agent_report_every
            .or(dur("agent_report_every", &file.agent_report_every)?)
            .unwrap_or(d.agent_report_every),
        wasm_module_max: match flags.wasm_module_max {
            Some(m) => m,
            None => file
                .wasm_module_max
                .as_deref()
                .map(sundial_protocol::wasm::parse_bytes)
                .transpose()
                .map_err(|e| anyhow::anyhow!("config `wasm_module_max`: {e}"))?
                .unwrap_or(d.wasm_module_max),
        },
        ..d
    };
    if limits.wasm_module_max == 0
        || limits.wasm_module_max > sundial_protocol::wasm::MODULE_BYTES_LIMIT
    {
        anyhow::bail!(
            "--wasm-module-max must be between 1 byte and {} bytes",
            sundial_protocol::wasm::MODULE_BYTES_LIMIT
        );
    }
    if !(u64::from(REPORT_EVERY_MS_MIN)..=u64::from(REPORT_EVERY_MS_MAX))
        .contains(&limits.agent_report_every.0)
    {
        anyhow::bail!("--agent-report-every must be between 1s and 1h");
    }
    if limits.handshakes_per_sec == 0 {
        anyhow::bail!("--handshakes-per-sec must be at least 1");
    }
    if limits.upload_runs_per_sec == 0 {
        anyhow::bail!("--upload-runs-per-sec must be at least 1");
    }
    if limits.period_min.0 == 0 {
        anyhow::bail!("--period-min must be at least 1ms");
    }
    if limits.run_retention.is_some_and(|r| r.0 < 60_000) {
        anyhow::bail!("--run-retention must be at least 1m");
    }
    if limits.audit_retention.is_some_and(|r| r.0 < 86_400_000) {
        anyhow::bail!("--audit-retention must be at least 1d (or 0: keep every entry)");
    }
    Ok(limits)
}

/// Reads and checks a coordinator configuration file.
pub fn load_config(path: &std::path::Path) -> Result<CoordinatorFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
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
    sundial_net::damage::exit_on_store_damage(
        "sundial-coordinator",
        "Stop the coordinator, move coordinator.redb aside (keep it for inspection) and restore it from a backup.",
    );
    let file = match &cli.command {
        Cmd::Serve {
            config: Some(path), ..
        } => match load_config(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("sundial-coordinator: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => CoordinatorFile::default(),
    };
    sundial_net::shell::init_logging(
        file.log.as_deref().unwrap_or("info"),
        cli.log_format.or(file.log_format),
    );
    match run(cli, file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "sundial-coordinator: {}",
                sundial_protocol::error_text(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, file: CoordinatorFile) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Completions { shell } => Ok(print_quietly(&sundial_net::shell::completions(
            shell,
            <Cli as clap::CommandFactory>::command(),
            "sundial-coordinator",
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
        Cmd::Migrate { store } => {
            let server::StoreChoice::Postgres(opts) = store_choice(&store, &file)? else {
                anyhow::bail!(
                    "migrate needs --store postgres://… (the embedded store migrates itself)"
                );
            };
            let pg = crate::pg::PgStore::open_unmigrated(&opts)?;
            let applied = pg.migrate()?;
            if applied.is_empty() {
                println!("the schema is up to date");
            } else {
                for v in applied {
                    println!("applied migration {v}");
                }
            }
            Ok(())
        }
        Cmd::RotateKey {
            data_dir,
            store_key,
            stage,
            activate,
        } => {
            let path = crate::store_key::key_file(&data_dir, store_key.as_deref());
            println!(
                "{}",
                crate::store_key::rotate(&path, stage, activate).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
        Cmd::Import { data_dir, store } => {
            let server::StoreChoice::Postgres(opts) = store_choice(&store, &file)? else {
                anyhow::bail!("import needs --store postgres://… (the database to move to)");
            };
            let mut said = std::time::Instant::now();
            let done = crate::import::import(&data_dir, &opts, |runs, total| {
                if said.elapsed() >= std::time::Duration::from_secs(2) || runs == total {
                    eprintln!("runs: {runs} of {total}");
                    said = std::time::Instant::now();
                }
            })?;
            println!(
                "imported {} admin(s), {} audit entries, {} agent(s), {} task(s), {} token(s), {} run(s); {} now uses {}",
                done.admins,
                done.audit,
                done.agents,
                done.tasks,
                done.tokens,
                done.runs,
                data_dir.display(),
                crate::pg::redact(&opts.url)
            );
            Ok(())
        }
        Cmd::Init {
            data_dir,
            advertise,
            server_name,
            force,
            store,
        } => {
            if let Err(why) = sundial_protocol::token::coordinator_list(&advertise) {
                anyhow::bail!(
                    "--advertise: {why} (several coordinators: HOST:PORT,HOST:PORT; e.g. 127.0.0.1:{PORT_DEFAULT})"
                );
            }
            refuse_root_for_others_dir(&data_dir, &advertise)?;
            let store = store_choice(&store, &file)?;
            let creds = server::init_on(&data_dir, &advertise, &server_name, force, store)?;
            println!("{}", creds.display());
            eprintln!(
                "the credentials of the owner `owner` (valid for a year): give each person, dashboard or script its own with `sundialctl admin create NAME --role viewer|operator|owner`"
            );
            Ok(())
        }
        Cmd::Serve {
            data_dir,
            listen,
            http,
            https,
            metrics_task_series,
            notify,
            notify_secret_file,
            notify_offline_after,
            store_key,
            limits: limit_flags,
            store,
            ..
        } => {
            let store_key = store_key.or(file.store_key.clone());
            let http = http.or(file.http);
            let https = https.or(file.https);
            let task_series = metrics_task_series
                .or(file.metrics_task_series)
                .unwrap_or(server::metrics::TASK_SERIES_MAX_DEFAULT);
            let notify = match notify.or(file.notify.clone()) {
                None => None,
                Some(url) => {
                    let secret = match notify_secret_file.or(file.notify_secret_file.clone()) {
                        None => None,
                        Some(path) => Some(
                            std::fs::read(&path)
                                .with_context(|| {
                                    format!("reading the notification secret {}", path.display())
                                })?
                                .trim_ascii()
                                .to_vec(),
                        ),
                    };
                    let offline = match notify_offline_after {
                        Some(d) => Some(d),
                        None => file
                            .notify_offline_after
                            .as_deref()
                            .map(DurationMs::parse)
                            .transpose()
                            .map_err(|e| anyhow::anyhow!("config `notify_offline_after`: {e}"))?,
                    }
                    .unwrap_or(DurationMs(600_000));
                    Some(server::notify::NotifyConfig {
                        url,
                        secret,
                        offline_after_ms: (offline.0 > 0).then_some(offline.as_millis_i64()),
                    })
                }
            };
            let limits = limits(&limit_flags, &file)?;
            let store = store_choice(&store, &file)?;
            let Some(data_dir) = data_dir.or(file.data_dir) else {
                anyhow::bail!(
                    "no data directory: pass --data-dir or set data_dir in the config file"
                );
            };
            let listen = listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], PORT_DEFAULT)));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let server =
                    Server::bind_keyed(&data_dir, listen, limits, store, store_key.as_deref())?;
                if let Some(addr) = http {
                    server.serve_http(addr, task_series).await?;
                }
                if let Some(addr) = https {
                    server.serve_https(addr, task_series).await?;
                }
                if let Some(config) = notify {
                    server.notify(&data_dir, config).await?;
                }
                server.run(shutdown_signal()).await?;
                Ok::<_, anyhow::Error>(())
            })
        }
    }
}
