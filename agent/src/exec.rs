//! The `exec` action: runs a program without a shell, in its own process
//! group, keeps the tails of its output, and kills the whole group when told
//! to (timeout) or when the program's main process exits (stragglers).
//!
//! Only programs matched by the agent's allowlist (`--allow-exec PATTERN`)
//! run; anything else yields a `rejected` run, never silence. A pattern is a
//! glob over the program as written in the task: `*` matches any run of
//! characters (slashes included), `?` one character. A program with a `..`
//! path component is always refused, so `/usr/bin/*` cannot be escaped.
//!
//! Invariants: output kept per stream is at most `tail_bytes_max` (the last
//! bytes); a run's process group is gone when [`run`] returns (short of a
//! child that left the group with `setsid`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sundial_protocol::seal::SealKeyPair;
use sundial_protocol::task::{
    ExecSpec, SealedEnv, WasmSpec, OUTPUT_TAIL_BYTES_DEFAULT, OUTPUT_TAIL_BYTES_MAX,
};
use sundial_protocol::{AgentId, Outcome};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

/// How long to keep reading output after the program exits, for data still
/// in the pipes.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Read chunk size.
const READ_CHUNK_BYTES: usize = 16 * 1024;

pub use sundial_protocol::policy::{ENV_ALLOWED_DEFAULT, ENV_REFUSED};

/// Which programs may run, with what environment, and how much output to keep.
#[derive(Debug, Clone)]
pub struct ExecPolicy {
    pub allow: Vec<String>,
    /// Names (globs) of [`ENV_REFUSED`] variables that tasks may set anyway.
    pub allow_env: Vec<String>,
    /// Kept per stream; at most [`OUTPUT_TAIL_BYTES_MAX`].
    pub tail_bytes_max: usize,
    /// This agent's id and sealing key, to open sealed variables at spawn.
    pub sealing: Option<(AgentId, Arc<SealKeyPair>)>,
    /// Whether and how functions run.
    pub functions: FunctionPolicy,
}

/// The device owner's rules for functions (`--allow-wasm` and the rest).
#[derive(Debug, Clone)]
pub struct FunctionPolicy {
    pub allowed: bool,
    /// Directories opened to functions, under their own paths.
    pub dirs: Vec<String>,
    /// The most fuel, memory and module size a task may ask for.
    pub fuel_max: u64,
    pub memory_max: u64,
    pub module_max: u64,
    /// The program that runs functions: this agent's own binary
    /// (`/proc/self/exe function-run`).
    pub runner: std::path::PathBuf,
}

impl Default for FunctionPolicy {
    fn default() -> Self {
        FunctionPolicy {
            allowed: false,
            dirs: Vec::new(),
            fuel_max: sundial_protocol::wasm::FUEL_CEILING_DEFAULT,
            memory_max: sundial_protocol::wasm::MEMORY_CEILING_DEFAULT,
            module_max: sundial_protocol::wasm::MODULE_BYTES_DEFAULT,
            runner: std::path::PathBuf::from("/proc/self/exe"),
        }
    }
}

impl FunctionPolicy {
    /// What the agent tells of functions in its Hello.
    pub fn hello(&self) -> sundial_protocol::wire::FunctionsHello {
        sundial_protocol::wire::FunctionsHello {
            allowed: self.allowed,
            fuel_max: self.fuel_max,
            memory_max: self.memory_max,
            module_max: self.module_max,
            modules: Vec::new(),
        }
    }

    /// Why `spec` may not run here, or `None`.
    pub fn refusal(&self, spec: &WasmSpec) -> Option<String> {
        use sundial_protocol::wasm::show_bytes;
        if !self.allowed {
            return Some(
                "functions are not allowed on this agent (the device owner starts it with --allow-wasm)".into(),
            );
        }
        if let Some(why) = spec.refusal() {
            return Some(why);
        }
        if spec.fuel() > self.fuel_max {
            return Some(format!(
                "the function asks for fuel {}; this device allows at most {} (--wasm-fuel-max)",
                spec.fuel(),
                self.fuel_max
            ));
        }
        if spec.memory_bytes() > self.memory_max {
            return Some(format!(
                "the function asks for {} of memory; this device allows at most {} (--wasm-memory-max)",
                show_bytes(spec.memory_bytes()),
                show_bytes(self.memory_max)
            ));
        }
        if spec.module_bytes > self.module_max {
            return Some(format!(
                "the function's module is {}; this device takes at most {} (--wasm-module-max)",
                show_bytes(spec.module_bytes),
                show_bytes(self.module_max)
            ));
        }
        None
    }
}

impl Default for ExecPolicy {
    fn default() -> Self {
        ExecPolicy {
            allow: Vec::new(),
            allow_env: Vec::new(),
            tail_bytes_max: OUTPUT_TAIL_BYTES_DEFAULT,
            sealing: None,
            functions: FunctionPolicy::default(),
        }
    }
}

impl ExecPolicy {
    /// Why `spec` may not run, or `None` if it may: its program (see
    /// [`ExecPolicy::refusal`]) and its environment.
    pub fn spec_refusal(&self, spec: &ExecSpec) -> Option<String> {
        if let Some(why) = self.refusal(&spec.program) {
            return Some(why);
        }
        let sealed = spec.sealed_env.iter().map(|s| &s.name);
        for name in spec.env.iter().map(|(k, _)| k).chain(sealed) {
            if let Some(why) = self.env_refusal(name) {
                return Some(why);
            }
        }
        None
    }

    /// The task's sealed variables, opened with this agent's key: at spawn
    /// only, never stored or logged. A value that does not open (not
    /// sealed to this agent, for instance one that joined after the task
    /// was made) is why the run is refused.
    pub fn open_sealed(&self, spec: &ExecSpec) -> Result<Vec<(String, OsString)>, String> {
        self.open_sealed_env(&spec.sealed_env)
    }

    /// [`ExecPolicy::open_sealed`] of any action's sealed variables.
    pub fn open_sealed_env(
        &self,
        sealed_env: &[SealedEnv],
    ) -> Result<Vec<(String, OsString)>, String> {
        if sealed_env.is_empty() {
            return Ok(Vec::new());
        }
        let Some((agent, key)) = &self.sealing else {
            return Err("this agent has no sealing key (it is not enrolled), so it cannot open the task's sealed variables".into());
        };
        sealed_env
            .iter()
            .map(|s| {
                let Some(sealed) = s.for_agent(*agent) else {
                    return Err(format!(
                        "the sealed variable {} has no value sealed to {agent} (it joined after the task was made, or changed its key): `sundialctl task reseal` seals it to every agent the task reaches",
                        s.name
                    ));
                };
                let value = sundial_protocol::seal::open(key, *agent, &s.name, sealed)
                    .map_err(|e| format!("the sealed variable {}: {e}", s.name))?;
                Ok((s.name.clone(), OsString::from_vec(value)))
            })
            .collect()
    }

    /// Why a task may not set the environment variable `name`, or `None`.
    /// Allowed: [`ENV_ALLOWED_DEFAULT`] and the owner's `--allow-env`
    /// patterns; never a name that is not a plain shell identifier (bash
    /// imports `BASH_FUNC_name%%` as a function); a name in
    /// [`ENV_REFUSED`] only if a pattern names it exactly. (The agent's own
    /// `SUNDIAL_*` variables are set after the task's, so they win.)
    pub fn env_refusal(&self, name: &str) -> Option<String> {
        sundial_protocol::policy::env_refusal(&self.allow_env, name)
    }

    /// Why `program` may not run, or `None` if it may.
    pub fn refusal(&self, program: &str) -> Option<String> {
        if program.is_empty() {
            return Some("the program is empty".into());
        }
        if program.split('/').any(|c| c == "..") {
            return Some(format!("program `{program}` has a `..` component"));
        }
        if self.allow.iter().any(|p| glob_match(p, program)) {
            None
        } else if self.allow.is_empty() {
            Some(format!(
                "program `{program}` is not allowed: this agent allows no programs (start it with --allow-exec PATTERN)"
            ))
        } else {
            Some(format!(
                "program `{program}` is not allowed by --allow-exec ({})",
                self.allow.join(", ")
            ))
        }
    }
}

pub use sundial_protocol::policy::glob_match;

/// How a run ended, as the executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub detail: Option<String>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
    /// The process id, if the program started.
    pub pid: Option<u32>,
}

impl ExecResult {
    fn not_started(outcome: Outcome, detail: String) -> ExecResult {
        ExecResult {
            outcome,
            exit_code: None,
            detail: Some(detail),
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
            pid: None,
        }
    }
}

/// Keeps the last `cap` bytes written to it.
#[derive(Debug)]
struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.buf.drain(..overflow);
        }
        self.buf.extend_from_slice(data);
    }
}

async fn read_tail<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> Vec<u8> {
    let mut tail = Tail {
        buf: Vec::new(),
        cap,
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.push(&chunk[..n]),
        }
    }
    tail.buf
}

fn kill_group(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        // ESRCH (already gone) is the common, harmless case.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Runs `spec` under `policy`. Resolves when the program has ended; a
/// message on `kill` (or the sender dropped after sending) kills its
/// process group and yields `timed_out`.
pub async fn run(spec: &ExecSpec, policy: &ExecPolicy, kill: oneshot::Receiver<()>) -> ExecResult {
    run_with(spec, policy, kill, |_| {}).await
}

/// [`run`], calling `spawned` with the program's pid (also its process
/// group) as soon as it has started.
pub async fn run_with(
    spec: &ExecSpec,
    policy: &ExecPolicy,
    kill: oneshot::Receiver<()>,
    spawned: impl FnOnce(u32),
) -> ExecResult {
    if let Some(why) = policy.spec_refusal(spec) {
        return ExecResult::not_started(Outcome::Rejected, why);
    }
    if let Some(cwd) = &spec.cwd {
        if !std::path::Path::new(cwd).is_dir() {
            return ExecResult::not_started(
                Outcome::Failed,
                format!("working directory `{cwd}` does not exist or is not a directory"),
            );
        }
    }
    let sealed = match policy.open_sealed(spec) {
        Ok(v) => v,
        Err(why) => return ExecResult::not_started(Outcome::Rejected, why),
    };
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .envs(sealed)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    supervise(cmd, None, &spec.program, policy, kill, spawned).await
}

/// Runs the function `spec`, whose module is `module` (from the store;
/// `None`: not there), under `policy`: in a child process of the agent's
/// binary (see [`crate::function`]). Resolves as [`run_with`].
pub async fn run_function(
    spec: &WasmSpec,
    name: &str,
    module: Option<Vec<u8>>,
    policy: &ExecPolicy,
    kill: oneshot::Receiver<()>,
    spawned: impl FnOnce(u32),
) -> ExecResult {
    if let Some(why) = policy.functions.refusal(spec) {
        return ExecResult::not_started(Outcome::Rejected, why);
    }
    let Some(module) = module else {
        return ExecResult::not_started(
            Outcome::Rejected,
            format!(
                "module {} is not in this agent's store (it arrives with the task when the agent is in session; a module over --wasm-module-max is not taken)",
                spec.module
            ),
        );
    };
    let sealed = match policy.open_sealed_env(&spec.sealed_env) {
        Ok(v) => v,
        Err(why) => return ExecResult::not_started(Outcome::Rejected, why),
    };
    let mut nonce = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).is_err() {
        return ExecResult::not_started(
            Outcome::Failed,
            "no randomness for the function's run".into(),
        );
    }
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let env = spec
        .env
        .iter()
        .cloned()
        .chain(
            sealed
                .into_iter()
                .map(|(k, v)| (k, v.to_string_lossy().into_owned())),
        )
        .collect();
    let input = crate::function::RunnerInput {
        module,
        sha256: spec.module,
        name: name.to_string(),
        args: spec.args.clone(),
        env,
        fuel: spec.fuel(),
        memory_bytes: spec.memory_bytes(),
        dirs: policy.functions.dirs.clone(),
        nonce: nonce.clone(),
        sleep_ms_max: 86_400_000,
    };
    let input = match postcard::to_allocvec(&input) {
        Ok(b) => b,
        Err(e) => {
            return ExecResult::not_started(Outcome::Failed, format!("the function's input: {e}"))
        }
    };
    let mut cmd = tokio::process::Command::new(&policy.functions.runner);
    cmd.arg("function-run")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let label = format!("function {}", spec.module.short());
    let mut r = supervise(cmd, Some(input), &label, policy, kill, spawned).await;
    if r.outcome == Outcome::Failed && r.exit_code == Some(crate::function::STOPPED_EXIT_CODE) {
        if let Some(why) = crate::function::take_verdict(&mut r.stderr_tail, &nonce) {
            r.exit_code = None;
            r.detail = Some(why);
        }
    }
    r
}

/// Starts `cmd` (writing `stdin` to it, if given), keeps its output's
/// tails, and waits for it or for `kill`.
async fn supervise(
    mut cmd: tokio::process::Command,
    stdin: Option<Vec<u8>>,
    program: &str,
    policy: &ExecPolicy,
    kill: oneshot::Receiver<()>,
    spawned: impl FnOnce(u32),
) -> ExecResult {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return ExecResult::not_started(
                Outcome::Failed,
                format!("could not start `{program}`: {e}"),
            )
        }
    };
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // A child that ends early closes its end: nothing to do.
            let _ = pipe.write_all(&bytes).await;
            let _ = pipe.shutdown().await;
        });
    }
    let pid = child.id();
    if let Some(pid) = pid {
        spawned(pid);
    }
    let cap = policy.tail_bytes_max.min(OUTPUT_TAIL_BYTES_MAX);
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_tail(s, cap)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(read_tail(s, cap)));

    let mut timed_out = false;
    let status = tokio::select! {
        s = child.wait() => s,
        k = kill => {
            // A dropped sender without a message means "nobody will ever ask": keep waiting.
            if k.is_ok() {
                timed_out = true;
                if let Some(pid) = pid {
                    kill_group(pid);
                }
            }
            child.wait().await
        }
    };
    // Stragglers left in the group would hold the pipes open: end them.
    if let Some(pid) = pid {
        kill_group(pid);
    }
    let collect = |h: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
        match h {
            Some(h) => tokio::time::timeout(DRAIN_AFTER_EXIT, h)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => Vec::new(),
        }
    };
    let stdout_tail = collect(stdout).await;
    let stderr_tail = collect(stderr).await;

    let (outcome, exit_code, detail) = match status {
        Err(e) => (
            Outcome::Failed,
            None,
            Some(format!("waiting for the program failed: {e}")),
        ),
        Ok(_) if timed_out => (
            Outcome::TimedOut,
            None,
            Some("killed at its timeout".into()),
        ),
        Ok(s) => match s.code() {
            Some(0) => (Outcome::Succeeded, Some(0), None),
            Some(c) => (Outcome::Failed, Some(c), None),
            None => {
                use std::os::unix::process::ExitStatusExt;
                (
                    Outcome::Failed,
                    None,
                    Some(format!("killed by signal {}", s.signal().unwrap_or(0))),
                )
            }
        },
    };
    ExecResult {
        outcome,
        exit_code,
        detail,
        stdout_tail,
        stderr_tail,
        pid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(program: &str, args: &[&str]) -> ExecSpec {
        ExecSpec {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..ExecSpec::default()
        }
    }

    fn allow(p: &[&str]) -> ExecPolicy {
        ExecPolicy {
            allow: p.iter().map(|s| s.to_string()).collect(),
            allow_env: Vec::new(),
            tail_bytes_max: 1024,
            sealing: None,
            functions: FunctionPolicy::default(),
        }
    }

    #[tokio::test]
    async fn loader_variables_are_refused_unless_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("ran");
        let mut s = spec("/bin/sh", &["-c", &format!("touch {}", marker.display())]);
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "PATH",
            "PYTHONPATH",
        ] {
            s.env = vec![(name.into(), "/tmp/evil".into())];
            let (_k, rx) = oneshot::channel();
            let r = run(&s, &allow(&["/bin/sh"]), rx).await;
            assert_eq!(r.outcome, Outcome::Rejected, "{name}");
            assert!(r.detail.unwrap_or_default().contains(name));
            assert!(!marker.exists(), "{name}: the program ran");
        }
        // Plain-data names pass; an owner may allow a refused one.
        s.env = vec![("TASK_GREETING".into(), "hi".into())];
        let (_k, rx) = oneshot::channel();
        assert_eq!(
            run(&s, &allow(&["/bin/sh"]), rx).await.outcome,
            Outcome::Succeeded
        );
        let mut p = allow(&["/bin/sh"]);
        p.allow_env = vec!["LD_LIBRARY_PATH".into()];
        s.env = vec![("LD_LIBRARY_PATH".into(), "/opt/lib".into())];
        let (_k, rx) = oneshot::channel();
        assert_eq!(run(&s, &p, rx).await.outcome, Outcome::Succeeded);
        s.env = vec![("LD_PRELOAD".into(), "/opt/lib/x.so".into())];
        let (_k, rx) = oneshot::channel();
        assert_eq!(run(&s, &p, rx).await.outcome, Outcome::Rejected);
    }

    #[tokio::test]
    async fn sealed_variables_open_at_spawn_for_their_agent_only() {
        use sundial_protocol::seal::{seal, SealedEnv};
        let mine = SealKeyPair::from_seed(&[5; 32]).expect("key");
        let other = SealKeyPair::from_seed(&[6; 32]).expect("key");
        let secret = "s3cr3t value with spaces";
        let sealed = seal(
            &mine.public(),
            AgentId(4),
            "TASK_TOKEN",
            secret.as_bytes(),
            [8; 32],
        )
        .expect("seals");
        let mut s = spec("/bin/sh", &["-c", "printf %s \"$TASK_TOKEN\""]);
        s.sealed_env = vec![SealedEnv {
            name: "TASK_TOKEN".into(),
            sealed: vec![(AgentId(4), sealed)],
        }];
        let mut p = allow(&["/bin/sh"]);
        p.sealing = Some((AgentId(4), Arc::new(mine.clone())));
        let (_k, rx) = oneshot::channel();
        let r = run(&s, &p, rx).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{:?}", r.detail);
        assert_eq!(r.stdout_tail, secret.as_bytes());

        // Another agent's key, an agent with no value sealed to it, an
        // unenrolled agent: rejected, and the detail never holds the value.
        for (sealing, says) in [
            (Some((AgentId(4), Arc::new(other))), "does not open"),
            (Some((AgentId(9), Arc::new(mine))), "no value sealed to a9"),
            (None, "no sealing key"),
        ] {
            let mut p = allow(&["/bin/sh"]);
            p.sealing = sealing;
            let (_k, rx) = oneshot::channel();
            let r = run(&s, &p, rx).await;
            assert_eq!(r.outcome, Outcome::Rejected);
            let detail = r.detail.unwrap_or_default();
            assert!(detail.contains(says), "{detail}");
            assert!(!detail.contains(secret));
        }
        // The device owner's environment rules hold for sealed names too.
        s.sealed_env[0].name = "LD_PRELOAD".into();
        let (_k, rx) = oneshot::channel();
        let r = run(&s, &p, rx).await;
        assert_eq!(r.outcome, Outcome::Rejected);
        assert!(r.detail.unwrap_or_default().contains("LD_PRELOAD"));
    }

    #[tokio::test]
    async fn tails_never_exceed_the_hard_maximum() {
        let mut p = allow(&["/bin/sh"]);
        p.tail_bytes_max = 5_000_000;
        let (_k, rx) = oneshot::channel();
        let r = run(
            &spec("/bin/sh", &["-c", "head -c 3000000 /dev/zero"]),
            &p,
            rx,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.stdout_tail.len(), OUTPUT_TAIL_BYTES_MAX);
    }

    #[tokio::test]
    async fn a_missing_working_directory_is_named() {
        let mut s = spec("/bin/true", &[]);
        s.cwd = Some("/nonexistent/dir".into());
        let (_k, rx) = oneshot::channel();
        let r = run(&s, &allow(&["/bin/true"]), rx).await;
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.detail.unwrap_or_default().contains("/nonexistent/dir"));
    }

    #[test]
    fn globs_match_whole_programs() {
        assert!(glob_match("/usr/bin/*", "/usr/bin/env"));
        assert!(glob_match("*", "anything/at/all"));
        assert!(glob_match("/opt/job-?", "/opt/job-7"));
        assert!(!glob_match("/usr/bin/*", "/usr/local/bin/x"));
        assert!(!glob_match("/bin/true", "/bin/true2"));
        let p = allow(&["/usr/bin/*"]);
        assert!(p.refusal("/usr/bin/../../bin/sh").is_some());
        assert!(p.refusal("/usr/bin/env").is_none());
        assert!(ExecPolicy::default().refusal("/bin/true").is_some());
    }

    #[test]
    fn tails_keep_the_last_bytes() {
        let mut t = Tail {
            buf: Vec::new(),
            cap: 4,
        };
        t.push(b"ab");
        t.push(b"cdef");
        assert_eq!(t.buf, b"cdef");
        t.push(b"g");
        assert_eq!(t.buf, b"defg");
        t.push(b"0123456789");
        assert_eq!(t.buf, b"6789");
    }

    #[tokio::test]
    async fn runs_captures_and_reports_exit_codes() {
        let (_k, rx) = oneshot::channel();
        let r = run(
            &spec("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"]),
            &allow(&["/bin/sh"]),
            rx,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.stdout_tail, b"out\n");
        assert_eq!(r.stderr_tail, b"err\n");
    }

    #[tokio::test]
    async fn refused_programs_are_rejected_not_run() {
        let (_k, rx) = oneshot::channel();
        let r = run(
            &spec("/bin/sh", &["-c", "exit 0"]),
            &allow(&["/usr/bin/*"]),
            rx,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Rejected);
        assert!(r.detail.unwrap_or_default().contains("not allowed"));
        assert_eq!(r.pid, None);
    }

    #[tokio::test]
    async fn output_is_capped_to_the_tail() {
        let (_k, rx) = oneshot::channel();
        let r = run(
            &spec(
                "/bin/sh",
                &[
                    "-c",
                    "i=0; while [ $i -lt 500 ]; do echo line-$i; i=$((i+1)); done",
                ],
            ),
            &allow(&["/bin/sh"]),
            rx,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.stdout_tail.len(), 1024);
        assert!(r.stdout_tail.ends_with(b"line-499\n"));
    }

    #[tokio::test]
    async fn kill_ends_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("grandchild-alive");
        let script = format!("(sleep 3; touch {}) & sleep 30", marker.display());
        let (k, rx) = oneshot::channel();
        let policy = allow(&["/bin/sh"]);
        let s = spec("/bin/sh", &["-c", &script]);
        let handle = tokio::spawn(async move { run(&s, &policy, rx).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        k.send(()).expect("executor listening");
        let r = handle.await.expect("joined");
        assert_eq!(r.outcome, Outcome::TimedOut);
        // The backgrounded grandchild was in the group and died with it.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!marker.exists(), "a process of the group survived the kill");
    }

    #[tokio::test]
    async fn a_missing_program_fails_with_a_reason() {
        let (_k, rx) = oneshot::channel();
        let r = run(&spec("/nonexistent/prog", &[]), &allow(&["*"]), rx).await;
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.detail.unwrap_or_default().contains("could not start"));
    }

    #[test]
    fn the_environment_is_allowed_by_construction() {
        let mut p = allow(&["/bin/sh"]);
        // bash imports these as functions: never, whatever is allowed.
        p.allow_env = vec!["*".into()];
        for name in ["BASH_FUNC_date%%", "BASH_FUNC_x", "A=B", "1X", ""] {
            assert!(p.env_refusal(name).is_some(), "{name:?} allowed under `*`");
        }
        // A broad pattern does not let the known code-running names through.
        for name in [
            "LD_PRELOAD",
            "LUA_INIT",
            "OPENSSL_CONF",
            "GIT_SSH_COMMAND",
            "PATH",
        ] {
            assert!(p.env_refusal(name).is_some(), "{name} allowed under `*`");
        }
        p.allow_env = vec!["GIT_SSH_COMMAND".into()];
        assert!(p.env_refusal("GIT_SSH_COMMAND").is_none(), "named exactly");
        // By default only plain data: the rest needs the owner's word.
        let d = allow(&["/bin/sh"]);
        for name in ["TZ", "LANG", "LC_ALL", "TASK_MODE"] {
            assert!(d.env_refusal(name).is_none(), "{name} refused");
        }
        for name in ["SECRET", "HOME", "GREETING"] {
            let why = d.env_refusal(name).expect("refused by default");
            assert!(why.contains("--allow-env"), "{why}");
        }
        let mut o = allow(&["/bin/sh"]);
        o.allow_env = vec!["APP_*".into()];
        assert!(o.env_refusal("APP_TOKEN").is_none());
        assert!(o.env_refusal("OTHER").is_some());
    }
}
