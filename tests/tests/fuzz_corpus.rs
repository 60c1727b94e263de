//! The fuzz corpus, replayed: every input kept in `fuzz/corpus/NAME/`
//! (seeds, and whatever `cargo fuzz` found and kept) goes through its
//! target's body again in every test run, so a crash once found stays
//! fixed. The fuzzing itself: `cd fuzz && cargo +nightly fuzz run NAME`.

use std::path::{Path, PathBuf};

use sundial_tests::fuzz::TARGETS;

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

#[test]
fn every_kept_input_passes_its_target_again() {
    let mut total = 0;
    for (name, target) in TARGETS {
        let dir = corpus_dir(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.expect("an entry").path();
            let data = std::fs::read(&path).expect("readable");
            target(&data);
            n += 1;
        }
        assert!(n > 0, "{name}: an empty corpus");
        total += n;
    }
    eprintln!("replayed {total} inputs through {} targets", TARGETS.len());
}

/// A brief blind fuzz in every test run (and so in CI): each target gets
/// `SUNDIAL_FUZZ_RUNS` (default 20,000) mutations of its kept inputs — bits
/// flipped, bytes set, inserted, removed or repeated, inputs spliced and
/// cut — from a seed printed here (`SUNDIAL_FUZZ_SEED` replays one). Not
/// coverage-guided as `cargo fuzz` is; it finds what a first mutation finds,
/// in seconds. An input that panics is written to a file that is named.
#[test]
fn mutations_of_kept_inputs_pass_their_targets() {
    let runs: usize = std::env::var("SUNDIAL_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("SUNDIAL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("mutating with SUNDIAL_FUZZ_SEED={seed}, {runs} runs per target");
    let mut state = seed;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for (name, target) in TARGETS {
        let dir = corpus_dir(name);
        let kept: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("a corpus")
            .map(|e| std::fs::read(e.expect("an entry").path()).expect("readable"))
            .collect();
        assert!(!kept.is_empty(), "{name}: an empty corpus");
        for _ in 0..runs {
            let mut data = kept[next() as usize % kept.len()].clone();
            for _ in 0..1 + next() % 4 {
                let len = data.len();
                let at = |r: u64| if len == 0 { 0 } else { r as usize % len };
                match next() % 7 {
                    0 if len > 0 => {
                        let i = at(next());
                        data[i] ^= 1 << (next() % 8);
                    }
                    1 if len > 0 => {
                        let i = at(next());
                        data[i] = next() as u8;
                    }
                    2 => {
                        let i = if len == 0 {
                            0
                        } else {
                            next() as usize % (len + 1)
                        };
                        let n = 1 + next() as usize % 8;
                        let bytes: Vec<u8> = (0..n).map(|_| next() as u8).collect();
                        data.splice(i..i, bytes);
                    }
                    3 if len > 0 => {
                        let i = at(next());
                        let n = (1 + next() as usize % 16).min(len - i);
                        data.drain(i..i + n);
                    }
                    4 if len > 0 => {
                        let i = at(next());
                        let n = (1 + next() as usize % 32).min(len - i);
                        let copy = data[i..i + n].to_vec();
                        data.splice(i..i, copy);
                    }
                    5 => {
                        let other = &kept[next() as usize % kept.len()];
                        let cut = if other.is_empty() {
                            0
                        } else {
                            next() as usize % other.len()
                        };
                        let keep = at(next());
                        data.truncate(keep);
                        data.extend_from_slice(&other[cut..]);
                    }
                    _ => {
                        let keep = at(next());
                        data.truncate(keep);
                    }
                }
            }
            let input = data.clone();
            if std::panic::catch_unwind(move || target(&data)).is_err() {
                let file = std::env::temp_dir().join(format!("sundial-fuzz-{name}-{seed}"));
                let _ = std::fs::write(&file, &input);
                panic!(
                    "{name}: a mutated input panicked (seed {seed}); it is in {} (replay: cd fuzz && cargo +nightly fuzz run {name} {})",
                    file.display(),
                    file.display()
                );
            }
        }
    }
}

/// Writes the seed inputs (run by hand: `cargo test -p sundial-tests --test
/// fuzz_corpus -- --ignored`); the fuzzer grows the corpus from them.
#[test]
#[ignore]
fn write_seed_corpus() {
    use sundial_protocol::codec::encode;
    use sundial_protocol::wire::*;
    let write = |name: &str, seed: &str, data: &[u8]| {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(seed), data).expect("seed");
    };
    let framed = |set: u8, bytes: Vec<u8>| {
        let mut v = vec![set];
        v.extend(bytes);
        v
    };
    let hello = AgentMsg::Hello {
        last_revision: 7,
        outbox_len: 2,
        agent_version: "0.3.0".into(),
        allow_exec: vec!["/bin/*".into()],
        seal_key: Default::default(),
        functions: Default::default(),
        allow_env: Default::default(),
    };
    write("frames", "hello", &framed(0, encode(&hello).expect("enc")));
    let report = AgentMsg::Report(AgentReport {
        outbox_len: 3,
        oldest_unsynced: Some(sundial_protocol::Timestamp::from_millis_saturating(5)),
        ..AgentReport::default()
    });
    write(
        "frames",
        "report",
        &framed(0, encode(&report).expect("enc")),
    );
    let policy = CoordMsg::Policy(ReconnectPolicy::default());
    let mut two = encode(&policy).expect("enc");
    two.extend(encode(&CoordMsg::ReportEvery { every_ms: 15_000 }).expect("enc"));
    write("frames", "policy-and-report-every", &framed(1, two));
    write(
        "frames",
        "task-list",
        &framed(2, encode(&AdminRequest::TaskList).expect("enc")),
    );
    write(
        "frames",
        "error",
        &framed(3, encode(&AdminResponse::Error("no".into())).expect("enc")),
    );
    let enroll = EnrollRequest {
        token_secret: vec![1; 32],
        csr_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
        name: Some("edge".into()),
        labels: vec![("site".into(), "lab".into())],
        seal_key: Default::default(),
    };
    write(
        "frames",
        "enroll",
        &framed(4, encode(&enroll).expect("enc")),
    );
    for (seed, expr) in [
        ("vixie", "30 2 * * 1-5"),
        ("seconds", "*/20 * * * * *"),
        ("quartz", "0 15 10 ? * MON-FRI"),
        ("quartz-year", "0 11 11 11 11 ? *"),
        ("step", "0/5 1/6 * * *"),
        ("zone", "CRON_TZ=America/New_York 30 2 * * *"),
        ("macro", "@weekly"),
        ("names", "0 9 * jan-mar Mon-FRI"),
    ] {
        write("cron", seed, expr.as_bytes());
    }
    let token = sundial_protocol::token::JoinToken {
        secret: vec![9; sundial_protocol::token::SECRET_BYTES],
        ca_sha256: [3; 32],
        server_name: "sundial-coordinator".into(),
        addresses: vec!["127.0.0.1:7447".into(), "c2.example.net:7447".into()],
    };
    write("token", "token", token.encode().as_bytes());
    write("token", "list", b"c1.example.net:7447, 127.0.0.1:7448");
    let spec = sundial_protocol::TaskSpec {
        id: sundial_protocol::TaskId(1),
        name: Some("backup".into()),
        target: sundial_protocol::task::Target::Selector(vec![("site".into(), "lab".into())]),
        schedule: sundial_protocol::Schedule::cron("30 2 * * *", "Europe/Berlin").expect("cron"),
        action: sundial_protocol::task::Action::Exec(sundial_protocol::task::ExecSpec {
            program: "/bin/echo".into(),
            args: vec!["hi".into()],
            ..Default::default()
        }),
        policies: Default::default(),
        revision: 3,
        created_at: sundial_protocol::Timestamp::from_millis_saturating(1_700_000_000_000),
        placement: None,
    };
    write(
        "records",
        "task",
        &sundial_protocol::records::encode(&sundial_protocol::records::TaskRecordV1::from_spec(
            &spec,
        )),
    );
    let run = sundial_protocol::RunRecord {
        task_id: sundial_protocol::TaskId(1),
        agent_id: sundial_protocol::AgentId(2),
        scheduled_at: sundial_protocol::Timestamp::from_millis_saturating(1_700_000_000_000),
        attempt: 1,
        fired_at: Some(sundial_protocol::Timestamp::from_millis_saturating(
            1_700_000_000_001,
        )),
        finished_at: Some(sundial_protocol::Timestamp::from_millis_saturating(
            1_700_000_000_050,
        )),
        outcome: sundial_protocol::Outcome::Failed,
        exit_code: Some(3),
        offline: true,
        detail: Some("exit 3".into()),
        stdout_tail: b"out".to_vec(),
        stderr_tail: b"err".to_vec(),
    };
    write(
        "records",
        "run",
        &sundial_protocol::records::encode(&sundial_protocol::records::RunRecordV1::from_run(&run)),
    );
    write(
        "config",
        "agent",
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml"))
            .expect("agent.toml")
            .as_slice(),
    );
    write(
        "config",
        "coordinator",
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml"))
            .expect("coordinator.toml")
            .as_slice(),
    );
    write(
        "config",
        "keys",
        b"data_dir = \"/var/lib/sundial-agent\"\nallow_exec = [\"/usr/bin/*\"]\nmetrics = \"127.0.0.1:9464\"\nstop_grace = \"10s\"\n",
    );
    write(
        "config",
        "creds",
        br#"{"coordinator":"127.0.0.1:7447","server_name":"sundial-coordinator","ca_pem":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n","cert_pem":"","key_pem":"","admin":"owner","role":"owner","expires_at":"2027-01-01T00:00:00Z"}"#,
    );
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .expect("csr");
    write("csr", "csr", csr.der());
    write("csr", "garbage", &[0x30, 0x82, 0xff, 0xff, 0x00]);

    // Sealed secrets and encryption at rest (0.5).
    let pair = sundial_protocol::seal::SealKeyPair::from_seed(&[9; 32]).expect("pair");
    let sealed = sundial_protocol::seal::seal(
        &pair.public(),
        sundial_protocol::AgentId(1),
        "TASK_X",
        b"value",
        [4; 32],
    )
    .expect("seal");
    write("records", "sealed-value", &sealed);
    let with_secret = spec
        .clone()
        .with_sealed_env(vec![sundial_protocol::seal::SealedEnv {
            name: "TASK_X".into(),
            sealed: vec![(sundial_protocol::AgentId(1), sealed)],
        }]);
    let task_v2 = sundial_protocol::records::encode_task(&with_secret);
    write("records", "task-sealed", &task_v2);
    let ring = sundial_net::at_rest::Keyring::parse(&format!("1 {} current\n", "07".repeat(32)))
        .expect("ring");
    let cipher = sundial_net::at_rest::StoreCipher::new(ring.clone());
    write(
        "records",
        "task-encrypted",
        &cipher.seal("tasks", &task_v2).expect("encrypt"),
    );
    write("config", "key-ring", ring.to_text().as_bytes());
    let hello = AgentMsg::Hello {
        last_revision: 1,
        outbox_len: 0,
        agent_version: "0.5.0".into(),
        allow_exec: vec![],
        seal_key: Some(pair.public()).into(),
        functions: Default::default(),
        allow_env: Default::default(),
    };
    write(
        "frames",
        "hello-sealing",
        &framed(0, encode(&hello).expect("enc")),
    );
    let reseal = AdminRequest::TaskReseal {
        id: sundial_protocol::TaskId(1),
        sealed_env: with_secret.action.sealed_env().to_vec(),
    };
    write(
        "frames",
        "reseal",
        &framed(2, encode(&reseal).expect("enc")),
    );
}

/// Writes the seed modules of the `modules` target (run by hand, as
/// `write_seed_corpus`).
#[test]
#[ignore]
fn write_module_seeds() {
    let dir = corpus_dir("modules");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let seeds = [
        (
            "noop",
            r#"(module (memory (export "memory") 1) (func (export "_start")))"#,
        ),
        (
            "spin",
            r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#,
        ),
        (
            "grow",
            r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (drop (memory.grow (i32.const 1))) (br $l))))"#,
        ),
        (
            "write",
            r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "path_open" (func $o (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "hi\n")
            (func (export "_start")
              (i32.store (i32.const 0) (i32.const 16))
              (i32.store (i32.const 4) (i32.const 3))
              (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
              (drop (call $w (i32.const 1) (i32.const 65530) (i32.const 900) (i32.const 8)))
              (drop (call $o (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 2) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 0)))
              (drop (call $p (i32.const 100) (i32.const 200) (i32.const 1) (i32.const 300)))))"#,
        ),
    ];
    for (name, text) in seeds {
        let bytes = wat::parse_str(text).expect("valid WAT");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}
