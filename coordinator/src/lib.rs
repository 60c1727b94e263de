//! `sundial-coordinator`: the coordinator and its admin CLI, `sundialctl`.
//!
//! So far this crate holds the pieces of `sundialctl` that need no
//! coordinator ([`cli`]).

pub mod cli;
