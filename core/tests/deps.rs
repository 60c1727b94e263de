//! The core depends on no async runtime, network or database: if `tokio`,
//! `quinn`, `rustls` or `redb` enters its normal dependency tree, this fails.

// A test is a shell: it may read the environment (which cargo runs it).
#![allow(clippy::disallowed_methods)]

use std::process::Command;

#[test]
fn the_core_pulls_in_no_runtime_network_or_database() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "sundial-core",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("sundial-core"), "{tree}");
    for banned in ["tokio", "quinn", "rustls", "redb"] {
        let found: Vec<&str> = tree
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|name| name == banned || name.starts_with(&format!("{banned}-")))
            })
            .collect();
        assert!(found.is_empty(), "{banned} in the core's tree: {found:?}");
    }
}
