//! The QUIC plumbing, shared with the agent: see `sundial-net`.

pub use sundial_net::*;
