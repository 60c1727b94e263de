//! `sundial-coordinator`: the coordinator and its admin CLI, `sundialctl`.
//!
//! [`server`] serves enrollment, agent sessions and the admin API over QUIC;
//! [`store`] keeps agents, tokens, tasks and runs in redb; [`pki`] is the CA;
//! [`client`] and [`cli`] are what `sundialctl` is made of.

pub mod cli;
pub mod client;
pub mod coordinator_cli;
pub mod import;
pub mod net;
pub mod pg;
pub mod pki;
pub mod server;
pub mod store;
pub mod store_key;
