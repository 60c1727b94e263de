//! The agent's configuration file (TOML), for `sundial-agent run --config FILE`.
//!
//! Every key is optional; flags on the command line override the file. An
//! unknown key or a bad value is an error naming the key and its line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Where the agent keeps its key, certificate and store.
    pub data_dir: Option<PathBuf>,
    /// Programs tasks may run (globs with `*` and `?`).
    #[serde(default)]
    pub allow_exec: Vec<String>,
    /// Log filter: error, warn, info, debug, trace (SUNDIAL_LOG overrides).
    pub log: Option<String>,
    /// `text` or `json` (see `--log-format`).
    pub log_format: Option<sundial_net::shell::LogFormat>,
    /// Bytes of stdout and of stderr kept per run (at most 1 MiB).
    pub output_tail_bytes: Option<usize>,
    /// Refused environment variables tasks may set anyway (globs).
    #[serde(default)]
    pub allow_env: Vec<String>,
    /// Runs going at once (default 64).
    pub max_concurrent_runs: Option<usize>,
    /// On SIGTERM, how long running actions may take to finish (default 10s).
    pub stop_grace: Option<String>,
    /// The coordinators' HOST:PORTs, replacing those stored at `join`
    /// (several coordinators on one store; a name with several addresses
    /// counts as several).
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// Serve the agent's own metrics on this TCP address (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// The store key ring file (default: `store.key` in the data directory,
    /// or the `sundial-store-key` systemd credential).
    pub store_key: Option<PathBuf>,
    /// Run functions (WebAssembly; `--allow-wasm`).
    pub allow_wasm: Option<bool>,
    /// Directories functions may read and write (`--allow-wasm-dir`).
    #[serde(default)]
    pub allow_wasm_dirs: Vec<String>,
    /// The most fuel a function may ask for.
    pub wasm_fuel_max: Option<u64>,
    /// The most memory a function may ask for, e.g. "64MiB".
    pub wasm_memory_max: Option<String>,
    /// The largest module this device takes, e.g. "16MiB".
    pub wasm_module_max: Option<String>,
}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<AgentFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = toml::from_str::<AgentFile>("data_dir = \"/x\"\nallow_exe = [\"a\"]\n")
            .expect_err("typo");
        assert!(e.to_string().contains("allow_exe"), "{e}");
        let e =
            toml::from_str::<AgentFile>("output_tail_bytes = \"big\"\n").expect_err("bad value");
        assert!(e.to_string().contains("output_tail_bytes"), "{e}");
        let ok: AgentFile =
            toml::from_str("allow_exec = [\"/usr/bin/*\"]\nlog = \"debug\"\n").expect("valid");
        assert_eq!(ok.allow_exec, ["/usr/bin/*"]);
    }
}
