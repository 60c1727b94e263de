//! `sundial-core`: the deterministic heart of Sundial.
//!
//! The timer wheel ([`wheel`]), the scheduler ([`scheduler`]) and the clock
//! guard ([`clock`]) decide *when*; they take time as input and own no
//! thread, so days of schedules and bad clocks are tested in virtual time.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and
//! depends on no async runtime, network or database — `tests/deps.rs`
//! fails if `tokio`, `quinn`, `rustls` or `redb` enters its dependency tree.

pub mod admission;
pub mod clock;
pub mod coord;
pub mod coord_store;
pub mod node;
pub mod scheduler;
pub mod session;
pub mod wasm;
pub mod wheel;
