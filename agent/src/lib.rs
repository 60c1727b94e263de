//! `sundial-agent`: keeps a device's tasks and fires them on time, online or not.
//!
//! The core is deterministic and I/O-free: [`wheel`] (timer wheel) and
//! [`scheduler`] (what fires when) take time as input. The shells around it
//! are [`store`] (redb), [`exec`] (process spawning), [`clock`] (real clocks)
//! and [`runtime`] (the loop that joins them).

pub mod cli;
pub mod clock;
pub mod config;
pub mod enroll;
pub mod exec;
pub mod fault;
pub mod function;
pub mod metrics;
pub mod runtime;
pub mod sealing;
pub use sundial_core::scheduler;
pub mod session;
pub mod status;
pub mod store;
pub use sundial_core::wheel;
