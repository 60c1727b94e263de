//! `sundial-agent`: keeps a device's tasks and fires them on time, online or not.
pub mod scheduler;
pub mod store;
pub mod wheel;
