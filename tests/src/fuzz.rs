//! The bodies of the fuzz targets: every decoder that sees bytes from
//! outside. `fuzz/` (cargo fuzz, nightly) calls them with generated inputs;
//! `tests/tests/fuzz_corpus.rs` replays the corpus kept in the repository
//! (`fuzz/corpus/NAME/`) through them in every `cargo test`, so a crash once
//! found stays fixed. Each must return, without a panic, a hang or an
//! unbounded allocation, whatever the bytes.

use std::sync::OnceLock;

use sundial_protocol::codec::FrameDecoder;
use sundial_protocol::cron::{split_tz_prefix, CronExpr};
use sundial_protocol::records::{self, RunRecordV1, TaskRecordV1};
use sundial_protocol::wire::{
    AdminRequest, AdminResponse, AgentMsg, CoordMsg, EnrollRequest, EnrollResponse,
};
use sundial_protocol::{AgentId, Schedule, Timestamp};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target, by name (the directory of its corpus).
pub const TARGETS: &[(&str, Body)] = &[
    ("frames", frames),
    ("cron", cron),
    ("token", token),
    ("records", records),
    ("config", config),
    ("csr", csr),
    ("modules", modules),
];

/// The largest frame a peer may send at all (the session's limit).
const FRAME_LIMIT: usize = sundial_protocol::codec::FRAME_BYTES_MAX;

/// Frames of every message set (the first byte picks which: each ALPN, in
/// each direction), fed in two pieces so reassembly is exercised; what
/// decodes goes through the checks the receiver makes.
pub fn frames(data: &[u8]) {
    let Some((&set, rest)) = data.split_first() else {
        return;
    };
    let mut dec = FrameDecoder::with_limit(FRAME_LIMIT);
    let cut = rest.len() / 2;
    dec.push(&rest[..cut]);
    drain(set, &mut dec);
    dec.push(&rest[cut..]);
    drain(set, &mut dec);
    let _ = dec.finish();
}

fn drain(set: u8, dec: &mut FrameDecoder) {
    for _ in 0..64 {
        let more = match set % 6 {
            0 => dec.next_message::<AgentMsg>().map(|m| {
                if let Some(AgentMsg::Report(r)) = &m {
                    let _ = r.refusal();
                }
                m.is_some()
            }),
            1 => dec.next_message::<CoordMsg>().map(|m| {
                if let Some(CoordMsg::Policy(p)) = m {
                    let _ = p.sanitized();
                }
                m.is_some()
            }),
            2 => dec.next_message::<AdminRequest>().map(|m| m.is_some()),
            3 => dec.next_message::<AdminResponse>().map(|m| m.is_some()),
            4 => dec.next_message::<EnrollRequest>().map(|m| m.is_some()),
            _ => dec.next_message::<EnrollResponse>().map(|m| m.is_some()),
        };
        if !matches!(more, Ok(true)) {
            return;
        }
    }
}

/// Cron expressions (with a zone prefix), and their next occurrences in
/// three zones, one with half-hour shifts.
pub fn cron(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `--cron` comes from a command line; a megabyte of it proves nothing.
    if text.len() > 4096 {
        return;
    }
    let (tz, expr) = split_tz_prefix(text);
    let _ = Schedule::cron(expr, tz.unwrap_or("UTC"));
    let Ok((c, _)) = CronExpr::parse_noted(expr) else {
        return;
    };
    // What it was rewritten to reads the same.
    let again = CronExpr::parse(c.as_str());
    assert!(
        again.is_ok(),
        "a rewrite that does not parse: {}",
        c.as_str()
    );
    for zone in [
        chrono_tz::UTC,
        chrono_tz::America::New_York,
        chrono_tz::Australia::Lord_Howe,
    ] {
        let mut t = Timestamp::from_millis_saturating(1_767_225_600_000);
        for _ in 0..4 {
            match c.next_after(zone, t) {
                Some(next) => {
                    assert!(next > t, "not after its input: {}", c.as_str());
                    t = next;
                }
                None => break,
            }
        }
    }
}

/// Join tokens and coordinator lists, as `join` reads them.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = sundial_protocol::token::JoinToken::decode(text) {
        // What decodes encodes to something that decodes to the same.
        let back = sundial_protocol::token::JoinToken::decode(&t.encode());
        assert_eq!(back.ok(), Some(t), "a token does not round-trip");
    }
    let _ = sundial_protocol::token::coordinator_list(text);
}

/// Stored records of both stores (tasks and runs, version byte first; a
/// task with its sealed variables; encrypted at rest), and sealed values
/// as an agent opens them.
pub fn records(data: &[u8]) {
    if let Ok(t) = records::decode::<TaskRecordV1>("tasks", 1, data) {
        let _ = t.into_spec(1);
    }
    if let Ok(r) = records::decode::<RunRecordV1>("outbox", 1, data) {
        let _ = r.into_run(1);
    }
    if let Ok(t) = records::decode_task("tasks", 1, data) {
        let _ = sundial_protocol::seal::refusal(t.action.sealed_env(), &[]);
    }
    // A store's cipher with a fixed key: what a damaged or forged
    // encrypted record meets.
    static CIPHER: OnceLock<Option<sundial_net::at_rest::StoreCipher>> = OnceLock::new();
    let cipher = CIPHER.get_or_init(|| {
        let text = format!("1 {} current\n", "07".repeat(32));
        sundial_net::at_rest::Keyring::parse(&text)
            .ok()
            .map(sundial_net::at_rest::StoreCipher::new)
    });
    if let Some(c) = cipher {
        if let Ok(plain) = c.open("tasks", data) {
            let _ = records::decode_task("tasks", 1, &plain);
        }
        let _ = c.verify(data);
    }
    static PAIR: OnceLock<Option<sundial_protocol::seal::SealKeyPair>> = OnceLock::new();
    if let Some(pair) =
        PAIR.get_or_init(|| sundial_protocol::seal::SealKeyPair::from_seed(&[9; 32]).ok())
    {
        let _ = sundial_protocol::seal::open(pair, AgentId(1), "TASK_X", data);
    }
}

/// The configuration files (agent, coordinator) and credentials files.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        // The store key ring file.
        if let Ok(ring) = sundial_net::at_rest::Keyring::parse(text) {
            let _ = sundial_net::at_rest::Keyring::parse(&ring.to_text());
        }
        let _ = toml::from_str::<sundial_agent::config::AgentFile>(text);
        let _ = toml::from_str::<sundial_coordinator::coordinator_cli::CoordinatorFile>(text);
    }
    if let Ok(creds) = serde_json::from_slice::<sundial_coordinator::pki::AdminCreds>(data) {
        let _ = creds.ca_der();
    }
}

/// Certificate signing requests, as enrollment and `admin create` hand
/// them to the CA.
pub fn csr(data: &[u8]) {
    static PKI: OnceLock<Option<(tempfile::TempDir, sundial_coordinator::pki::Pki)>> =
        OnceLock::new();
    let Some((_, pki)) = PKI.get_or_init(|| {
        let dir = tempfile::tempdir().ok()?;
        let (pki, _) = sundial_coordinator::pki::Pki::init(
            dir.path(),
            "sundial-coordinator",
            "127.0.0.1:7447",
            Timestamp::from_millis_saturating(4_102_444_800_000),
        )
        .ok()?;
        Some((dir, pki))
    }) else {
        return;
    };
    let _ = pki.sign_agent_csr(data, AgentId(1));
    let _ = pki.sign_admin_csr(
        data,
        "fuzz",
        Timestamp::from_millis_saturating(4_102_444_800_000),
    );
}

/// Function modules, as the coordinator checks an upload and as an
/// agent's runner loads and runs one: a module that passes the check runs
/// in the sandbox with little fuel and memory and no directory.
pub fn modules(data: &[u8]) {
    if sundial_core::wasm::inspect(data, 1 << 20).is_err() {
        return;
    }
    let input = sundial_agent::function::RunnerInput {
        module: data.to_vec(),
        sha256: sundial_protocol::wasm::ModuleHash::of(data),
        name: "fuzz".into(),
        args: vec!["a".into()],
        env: vec![("TASK_X".into(), "1".into())],
        fuel: 100_000,
        memory_bytes: 1 << 20,
        dirs: Vec::new(),
        nonce: "fuzz".into(),
        sleep_ms_max: 1,
    };
    let _ =
        sundial_agent::function::run(input, Box::new(std::io::sink()), Box::new(std::io::sink()));
}
