//! `sundial-tests`: the fleet harness — fault-injecting UDP relay, process
//! harness, invariant checker, partition and crash scenarios, and the
//! `sundial-sim` binary.
//!
//! Not built yet: it needs the coordinator and the QUIC session first (see
//! ARCHITECTURE.md, "Status"). The crate exists so the workspace has its
//! final shape.
