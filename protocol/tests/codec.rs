//! The framing codec round-trips messages and turns truncated, oversized,
//! wrong-version and random bytes into errors, never panics.

use proptest::prelude::*;
use sundial_protocol::codec::{encode, FrameDecoder, FrameError, FRAME_BYTES_MAX};
use sundial_protocol::task::{AgentId, Outcome, RunRecord, TaskId};
use sundial_protocol::wire::{AgentMsg, CoordMsg};
use sundial_protocol::Timestamp;

fn sample_run(i: u64) -> RunRecord {
    RunRecord {
        task_id: TaskId(i),
        agent_id: AgentId(7),
        scheduled_at: Timestamp::from_millis(1_780_000_000_000 + i as i64).expect("in range"),
        attempt: 1,
        fired_at: Some(Timestamp::from_millis(1_780_000_000_001).expect("in range")),
        finished_at: None,
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        offline: true,
        detail: None,
        stdout_tail: b"hello".to_vec(),
        stderr_tail: vec![],
    }
}

#[test]
fn messages_round_trip_in_pieces() {
    let msgs = vec![
        AgentMsg::Hello {
            last_revision: 42,
            outbox_len: 3,
            agent_version: "0.1.0".into(),
            allow_exec: vec![],
            seal_key: Default::default(),
            functions: Default::default(),
            allow_env: Some(vec!["APP_*".into()]).into(),
        },
        AgentMsg::Results {
            batch_id: 9,
            runs: (0..10).map(sample_run).collect(),
        },
        AgentMsg::ClockProbe {
            t1: Timestamp::EPOCH,
        },
    ];
    let mut bytes = Vec::new();
    for m in &msgs {
        bytes.extend(encode(m).expect("encodes"));
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    // Feed one byte at a time: frames may arrive split anywhere.
    for b in &bytes {
        dec.push(std::slice::from_ref(b));
        while let Some(m) = dec.next_message::<AgentMsg>().expect("valid stream") {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    dec.finish().expect("nothing left over");
}

#[test]
fn truncated_frame_is_reported_at_end_of_stream() {
    let bytes = encode(&CoordMsg::Refused { reason: "x".into() }).expect("encodes");
    let mut dec = FrameDecoder::new();
    dec.push(&bytes[..bytes.len() - 1]);
    assert_eq!(dec.next_message::<CoordMsg>(), Ok(None));
    assert!(matches!(dec.finish(), Err(FrameError::Truncated(_))));
}

#[test]
fn oversized_frame_is_refused_from_its_header() {
    let mut dec = FrameDecoder::new();
    dec.push(&((FRAME_BYTES_MAX as u32) + 1).to_be_bytes());
    assert!(matches!(
        dec.next_message::<CoordMsg>(),
        Err(FrameError::Oversized { .. })
    ));
    // The stream stays failed.
    assert!(dec.next_message::<CoordMsg>().is_err());
    let huge = AgentMsg::Results {
        batch_id: 1,
        runs: vec![RunRecord {
            stdout_tail: vec![0; FRAME_BYTES_MAX],
            ..sample_run(1)
        }],
    };
    assert!(matches!(encode(&huge), Err(FrameError::Oversized { .. })));
}

#[test]
fn unknown_version_is_refused() {
    let mut bytes = encode(&AgentMsg::ClockProbe {
        t1: Timestamp::EPOCH,
    })
    .expect("encodes");
    bytes[4] = 99;
    let mut dec = FrameDecoder::new();
    dec.push(&bytes);
    assert_eq!(
        dec.next_message::<AgentMsg>(),
        Err(FrameError::UnknownVersion(99))
    );
}

proptest! {
    /// Random bytes never panic the decoder; they decode or fail cleanly.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        for _ in 0..64 {
            match dec.next_message::<AgentMsg>() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Valid framing around random payloads: an error or a message, never a panic.
    #[test]
    fn random_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(1);
        bytes.extend(&payload);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        let _ = dec.next_message::<CoordMsg>();
    }
}

#[test]
fn an_idle_stream_does_not_keep_the_room_of_a_large_frame() {
    let big = CoordMsg::Refused {
        reason: "x".repeat(900 * 1024),
    };
    let small = CoordMsg::Refused { reason: "y".into() };
    let mut dec = FrameDecoder::new();
    dec.push(&encode(&big).expect("encodes"));
    assert!(dec.held_bytes() >= 900 * 1024);
    assert_eq!(dec.next_message::<CoordMsg>(), Ok(Some(big)));
    assert!(dec.held_bytes() <= 16 * 1024, "held {}", dec.held_bytes());
    // Small frames keep their room: no allocation per message.
    dec.push(&encode(&small).expect("encodes"));
    let held = dec.held_bytes();
    assert_eq!(dec.next_message::<CoordMsg>(), Ok(Some(small.clone())));
    assert_eq!(dec.held_bytes(), held);
}
