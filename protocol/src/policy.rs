//! What a task does when things go wrong: missed occurrences, failures,
//! overlapping runs, runaway actions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::time::DurationMs;

/// Occurrences whose time passed while the agent was down (or its clock was
/// held) by more than `grace`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MisfirePolicy {
    pub mode: MisfireMode,
    /// An occurrence at most this late still fires normally.
    pub grace: DurationMs,
}

/// What to do with missed occurrences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MisfireMode {
    /// Record every missed occurrence as `skipped`.
    Skip,
    /// Run the most recent missed occurrence once; record the others `skipped`.
    Once,
    /// Run the most recent `cap` missed occurrences; record older ones `skipped`.
    All { cap: u32 },
}

impl MisfireMode {
    /// The cap used by `all` when none is given.
    pub const ALL_CAP_DEFAULT: u32 = 100;
}

impl Default for MisfirePolicy {
    fn default() -> Self {
        MisfirePolicy {
            mode: MisfireMode::Once,
            grace: DurationMs(60_000),
        }
    }
}

impl fmt::Display for MisfireMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MisfireMode::Skip => f.write_str("skip"),
            MisfireMode::Once => f.write_str("once"),
            MisfireMode::All { cap } => write!(f, "all:{cap}"),
        }
    }
}

impl FromStr for MisfireMode {
    type Err = String;
    /// `skip`, `once`, `all` or `all:CAP`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(MisfireMode::Skip),
            "once" => Ok(MisfireMode::Once),
            "all" => Ok(MisfireMode::All {
                cap: MisfireMode::ALL_CAP_DEFAULT,
            }),
            other => match other.strip_prefix("all:").map(str::parse::<u32>) {
                Some(Ok(cap)) if cap > 0 => Ok(MisfireMode::All { cap }),
                _ => Err(format!(
                    "misfire `{s}`: expected skip, once, all or all:CAP (CAP >= 1)"
                )),
            },
        }
    }
}

/// The most retries a task may ask for.
pub const RETRIES_MAX: u32 = 100;

/// Retries of a failed, timed-out or interrupted run of one occurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = no retry).
    pub retries: u32,
    /// Delay before the first retry; doubles for each further one.
    pub backoff_initial: DurationMs,
    /// The longest delay between attempts.
    pub backoff_max: DurationMs,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 0,
            backoff_initial: DurationMs(1_000),
            backoff_max: DurationMs(300_000),
        }
    }
}

impl RetryPolicy {
    /// Whether attempt number `attempt` (1-based) may be followed by another.
    pub fn allows_after(&self, attempt: u32) -> bool {
        attempt <= self.retries
    }

    /// The delay before the attempt after `attempt` (1-based):
    /// `initial * 2^(attempt-1)`, capped at `backoff_max`.
    pub fn backoff_after(&self, attempt: u32) -> DurationMs {
        let shift = attempt.saturating_sub(1).min(62);
        let d = self.backoff_initial.0.saturating_mul(1u64 << shift);
        DurationMs(d.min(self.backoff_max.0))
    }
}

/// Whether a new occurrence may start while a run of the same task is going.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlapPolicy {
    #[default]
    Allow,
    /// The new occurrence is recorded as `skipped`.
    Forbid,
}

impl FromStr for OverlapPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(OverlapPolicy::Allow),
            "forbid" => Ok(OverlapPolicy::Forbid),
            _ => Err(format!("overlap `{s}`: expected allow or forbid")),
        }
    }
}

impl fmt::Display for OverlapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverlapPolicy::Allow => "allow",
            OverlapPolicy::Forbid => "forbid",
        })
    }
}

/// All policies of a task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policies {
    pub misfire: MisfirePolicy,
    pub retry: RetryPolicy,
    pub overlap: OverlapPolicy,
    /// A run still going after this long is killed and recorded `timed_out`.
    pub timeout: Option<DurationMs>,
}

/// The environment variables any task may set: plain data no program reads
/// as code. Anything else needs the device owner's `--allow-env PATTERN`.
/// (`SUNDIAL_*` are the agent's own, describing the run; set after the
/// task's, they win.)
pub const ENV_ALLOWED_DEFAULT: &[&str] = &["TZ", "LANG", "LANGUAGE", "LC_*", "TASK_*", "SUNDIAL_*"];

/// Environment variables known to make the loader, the C library, a shell
/// or an interpreter run code other than the allowed program (`LD_PRELOAD`,
/// `BASH_ENV`, `PYTHONPATH`, ...), or find other programs (`PATH`): refused
/// unless `--allow-env` names them, so that a broad pattern such as `*`
/// does not let them through by accident. Globs, as for programs.
pub const ENV_REFUSED: &[&str] = &[
    "LD_*",
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_*",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "PATH",
    "IFS",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PYTHON*",
    "PERL5*",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "LUA_INIT*",
    "LUA_PATH*",
    "LUA_CPATH*",
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "OPENSSL_MODULES",
    "GIT_*",
    "SSH_ASKPASS",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "PROMPT_COMMAND",
    "ZDOTDIR",
    "TCLLIBPATH",
    "R_PROFILE*",
    "GEM_*",
    "CLASSPATH",
];

/// Why a task may not set the environment variable `name` on an agent
/// started with `--allow-env` patterns `allow_env`, or `None`. Allowed:
/// [`ENV_ALLOWED_DEFAULT`] and the owner's patterns; never a name that is
/// not a plain shell identifier (bash imports `BASH_FUNC_name%%` as a
/// function); a name in [`ENV_REFUSED`] only if a pattern names it exactly.
/// The agent decides by this rule; the coordinator warns by it.
pub fn env_refusal(allow_env: &[String], name: &str) -> Option<String> {
    let plain = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain || name.starts_with("BASH_FUNC_") {
        return Some(format!(
            "environment variable `{name}` is never allowed: a name that is not a plain identifier (letters, digits, `_`) can define shell functions"
        ));
    }
    if ENV_REFUSED.iter().any(|p| glob_match(p, name)) {
        if allow_env.iter().any(|p| p == name) {
            return None;
        }
        return Some(format!(
            "environment variable `{name}` is not allowed: it can make the program load or run other code (start the agent with --allow-env {name} to allow it)"
        ));
    }
    let allowed = ENV_ALLOWED_DEFAULT
        .iter()
        .copied()
        .chain(allow_env.iter().map(String::as_str))
        .any(|p| glob_match(p, name));
    if allowed {
        return None;
    }
    Some(format!(
        "environment variable `{name}` is not allowed on this agent: tasks may set TZ, LANG, LANGUAGE, LC_*, TASK_* and what the device owner allows (start the agent with --allow-env '{name}' or a pattern)"
    ))
}

/// Glob match of `text` against `pattern` (`*` any run, `?` one char).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let r = RetryPolicy {
            retries: 5,
            backoff_initial: DurationMs(1_000),
            backoff_max: DurationMs(5_000),
        };
        let delays: Vec<u64> = (1..=5).map(|a| r.backoff_after(a).0).collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 5_000, 5_000]);
        assert!(r.allows_after(5));
        assert!(!r.allows_after(6));
    }

    #[test]
    fn misfire_modes_parse() {
        assert_eq!("all:3".parse(), Ok(MisfireMode::All { cap: 3 }));
        assert!("all:0".parse::<MisfireMode>().is_err());
        assert!("later".parse::<MisfireMode>().is_err());
    }
}
