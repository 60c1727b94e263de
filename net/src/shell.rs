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

/// Where a command line takes a task's or an agent's name: the
/// subcommand path, and the option (`None`: a positional argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameSlot {
    pub path: Vec<String>,
    pub long: Option<String>,
    /// `tasks` or `agents`: what the names subcommand is asked for.
    pub kind: &'static str,
}

/// Every place in `cmd` whose value is named `TASK` or `AGENT`.
pub fn name_slots(cmd: &clap::Command) -> Vec<NameSlot> {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<NameSlot>) {
        for arg in cmd.get_arguments() {
            let kind = match arg.get_value_names().and_then(|v| v.first()) {
                Some(v) if v.as_str() == "TASK" => "tasks",
                Some(v) if v.as_str() == "AGENT" => "agents",
                _ => continue,
            };
            let long = arg.get_long().map(str::to_owned);
            if long.is_none() && !arg.is_positional() {
                continue;
            }
            out.push(NameSlot {
                path: path.clone(),
                long,
                kind,
            });
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() {
                continue;
            }
            path.push(sub.get_name().to_owned());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(cmd, &mut Vec::new(), &mut out);
    out
}

/// Every option of `cmd` and its subcommands that takes a value, as typed
/// (`--creds`, `-o`), sorted, once each.
fn valued_options(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if arg.is_positional() || !arg.get_action().takes_values() {
                continue;
            }
            if let Some(l) = arg.get_long() {
                out.insert(format!("--{l}"));
            }
            if let Some(c) = arg.get_short() {
                out.insert(format!("-{c}"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(cmd, &mut out);
    out.into_iter().collect()
}

/// Shell code, after [`completions`], that completes task and agent names
/// by asking `bin names_sub tasks|agents` (which asks the coordinator),
/// where the command line takes them; elsewhere the static completions
/// answer. Bash, zsh and fish; other shells get nothing more.
pub fn name_completions(
    shell: clap_complete::Shell,
    cmd: &clap::Command,
    bin: &str,
    names_sub: &str,
) -> String {
    use std::fmt::Write as _;
    let slots = name_slots(cmd);
    let func = format!("_{}_names", bin.replace('-', "_"));
    let mut o = String::new();
    match shell {
        clap_complete::Shell::Bash | clap_complete::Shell::Zsh => {
            // One case per slot on "PATH|PREV": an option's value when the
            // word before is the option, a positional when it is no option.
            // Options that take a value: the word after one is no subcommand.
            let valued = valued_options(cmd).join("|");
            let mut cases = String::new();
            for s in &slots {
                let path = s.path.join(" ");
                let pattern = match &s.long {
                    Some(l) => format!("\"{path}\"\\|--{l}|\"{path} \"*\\|--{l}"),
                    None => format!("\"{path}\"\\|[!-]*|\"{path} \"*\\|[!-]*"),
                };
                let _ = writeln!(cases, "        {pattern}) kind={} ;;", s.kind);
            }
            let _ = write!(
                o,
                r#"
# Task and agent names, from the coordinator of SUNDIAL_CREDS.
{func}_kind() {{
    # $1: the words before the cursor, the command first.
    local path="" prev="" skip="" w
    shift
    for w in "$@"; do
        if [ -n "$skip" ]; then
            skip=""
            prev="$w"
            continue
        fi
        case "$w" in
            {valued}) skip=1 ;;
            -*) ;;
            *) path="${{path:+$path }}$w" ;;
        esac
        prev="$w"
    done
    local kind=""
    case "$path|$prev" in
{cases}    esac
    printf '%s' "$kind"
}}
"#
            );
            if shell == clap_complete::Shell::Bash {
                let _ = write!(
                    o,
                    r#"{func}() {{
    local kind cur="${{COMP_WORDS[COMP_CWORD]}}"
    kind=$({func}_kind "${{COMP_WORDS[@]:0:COMP_CWORD}}")
    if [ -n "$kind" ]; then
        # Matched by prefix here, not by compgen -W, which would expand
        # what the names say.
        local name
        COMPREPLY=()
        while IFS= read -r name; do
            [[ "$name" == "$cur"* ]] && COMPREPLY+=("$name")
        done < <({bin} {names_sub} "$kind" 2>/dev/null)
        return 0
    fi
    _{bin_us} "$@"
}}
complete -F {func} -o bashdefault -o default {bin}
"#,
                    bin_us = bin.replace('-', "__")
                );
            } else {
                let _ = write!(
                    o,
                    r#"{func}() {{
    local kind
    kind=$({func}_kind "${{(@)words[1,CURRENT-1]}}")
    if [[ -n "$kind" ]]; then
        local -a names
        names=("${{(@f)$({bin} {names_sub} "$kind" 2>/dev/null)}}")
        compadd -a names
        return
    fi
    _{bin_us} "$@"
}}
compdef {func} {bin}
"#,
                    bin_us = bin.replace('-', "_")
                );
            }
        }
        clap_complete::Shell::Fish => {
            let _ = writeln!(
                o,
                "\n# Task and agent names, from the coordinator of SUNDIAL_CREDS."
            );
            for s in &slots {
                let mut cond: Vec<String> = Vec::new();
                cond.push(match s.path.first() {
                    Some(first) => format!("__fish_seen_subcommand_from {first}"),
                    None => "true".into(),
                });
                for p in s.path.iter().skip(1) {
                    cond.push(format!("__fish_seen_subcommand_from {p}"));
                }
                let cond = cond.join("; and ");
                let source = format!("({bin} {names_sub} {} 2>/dev/null)", s.kind);
                let _ = match &s.long {
                    Some(l) => writeln!(o, "complete -c {bin} -n '{cond}' -l {l} -x -a '{source}'"),
                    None => writeln!(o, "complete -c {bin} -n '{cond}' -f -a '{source}'"),
                };
            }
        }
        _ => {}
    }
    o
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
