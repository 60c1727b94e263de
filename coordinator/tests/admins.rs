//! Admins as people, through `sundialctl` and the admin client as an
//! operator uses them: named credentials with roles, revocation that cuts a
//! live connection, expiry that says so, and an audit log that holds every
//! committed change — also across a `kill -9` with two admins at work.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{wait_for, Coordinator};
use serde_json::Value;
use sundial_coordinator::client::AdminClient;
use sundial_coordinator::pki::AdminCreds;
use sundial_protocol::wire::{AdminRequest, AdminResponse};

/// `admin create NAME --role ROLE` by the owner; the new file's path.
fn create(coord: &Coordinator, root: &Path, name: &str, role: &str, extra: &[&str]) -> PathBuf {
    let out = root.join(format!("{name}.creds"));
    let mut args = vec![
        "admin",
        "create",
        name,
        "--role",
        role,
        "--out",
        out.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let said = coord.ctl_ok(&args);
    assert!(said.contains(name), "{said}");
    out
}

fn refused(coord: &Coordinator, creds: &Path, args: &[&str]) -> String {
    let (ok, out, err) = coord.ctl_as(creds, args);
    assert!(!ok, "{args:?} should be refused; it said {out}");
    err
}

fn audit(coord: &Coordinator, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "list", "--limit", "10000"];
    args.extend_from_slice(extra);
    coord.json(&args).as_array().cloned().unwrap_or_default()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn a_colleague_gets_operator_rights_a_dashboard_viewer_rights_and_revocation_cuts_them_off() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let alice = create(&coord, root.path(), "alice", "operator", &[]);
    let dash = create(&coord, root.path(), "dash", "viewer", &["--ttl", "30d"]);
    // The files are the admins' own: readable by their owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&alice)
        .expect("file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "credentials readable by others: {mode:o}");
    // A second create of a live name, and a file in the way, are refused.
    let again = root.path().join("alice-2.creds");
    let (ok, _, err) = coord.ctl(&[
        "admin",
        "create",
        "alice",
        "--role",
        "viewer",
        "--out",
        again.to_str().expect("utf-8"),
    ]);
    assert!(!ok && err.contains("exists already"), "{err}");
    let (ok, _, err) = coord.ctl(&[
        "admin",
        "create",
        "zed",
        "--role",
        "viewer",
        "--out",
        alice.to_str().expect("utf-8"),
    ]);
    assert!(!ok && err.contains("refusing to replace"), "{err}");

    // The operator manages tasks and tokens, not agents or admins.
    let task = coord
        .ctl_as(
            &alice,
            &[
                "task",
                "create",
                "--name",
                "backup",
                "--selector",
                "site=lab",
                "--every",
                "1h",
                "--env",
                "API_KEY=s3cret",
                "--",
                "/bin/true",
            ],
        )
        .1;
    assert!(task.starts_with('t'), "{task}");
    // A viewer is shown environment names, never values, also on the wire.
    let env_as = |file: &Path| {
        let creds = AdminCreds::load(file).expect("credentials");
        let rt = runtime();
        rt.block_on(async {
            let c = AdminClient::connect(&creds).await.expect("connects");
            let id = task.parse().expect("a task id");
            match c.request(&AdminRequest::TaskGet(id)).await {
                Ok(AdminResponse::Task(t)) => t.spec.action.env().to_vec(),
                other => panic!("task get: {other:?}"),
            }
        })
    };
    assert_eq!(
        env_as(&dash),
        vec![("API_KEY".to_owned(), "(hidden from viewers)".to_owned())]
    );
    assert_eq!(
        env_as(&coord.creds()),
        vec![("API_KEY".to_owned(), "s3cret".to_owned())]
    );
    assert!(coord.ctl_as(&alice, &["token", "create"]).0);
    let err = refused(&coord, &alice, &["agent", "revoke", "a1"]);
    assert!(err.contains("needs the owner role"), "{err}");
    let err = refused(
        &coord,
        &alice,
        &["admin", "create", "mallory", "--role", "owner"],
    );
    assert!(err.contains("needs the owner role"), "{err}");
    // The dashboard reads, and changes nothing.
    assert!(coord.ctl_as(&dash, &["task", "list"]).1.contains("backup"));
    assert!(coord.ctl_as(&dash, &["audit", "list"]).0);
    let err = refused(&coord, &dash, &["task", "cancel", "backup"]);
    assert!(
        err.contains("needs the operator role") && err.contains("viewer"),
        "{err}"
    );

    // Alice holds a connection open; revoking her cuts it at once.
    let creds = AdminCreds::load(&alice).expect("alice's credentials");
    let rt = runtime();
    let client = rt
        .block_on(AdminClient::connect(&creds))
        .expect("alice connects");
    assert!(matches!(
        rt.block_on(client.request(&AdminRequest::TaskList)),
        Ok(AdminResponse::Tasks(_))
    ));
    assert_eq!(
        coord.ctl_ok(&["admin", "revoke", "alice"]),
        "revoked admin alice"
    );
    let err = rt
        .block_on(client.request(&AdminRequest::TaskList))
        .expect_err("a revoked admin's open connection is cut");
    assert!(err.contains("revoked"), "{err}");
    // And refused when she comes back.
    let err = refused(&coord, &alice, &["task", "list"]);
    assert!(err.contains("refused this credential"), "{err}");
    // The last owner stays.
    let (ok, _, err) = coord.ctl(&["admin", "revoke", "owner"]);
    assert!(!ok && err.contains("last owner"), "{err}");

    // Who did what: alice's change with its revision, her refusals, from
    // where; the owner's admin changes.
    let admins = coord.json(&["admin", "list"]);
    let by_name: BTreeMap<String, Value> = admins
        .as_array()
        .expect("a list")
        .iter()
        .map(|a| (a["name"].as_str().unwrap_or("").to_owned(), a.clone()))
        .collect();
    assert_eq!(by_name["alice"]["state"], "revoked");
    assert_eq!(by_name["alice"]["role"], "operator");
    assert!(by_name["alice"]["last_used"].is_string());
    assert_eq!(by_name["dash"]["role"], "viewer");
    assert_eq!(by_name["owner"]["created_by"], "init");
    let hers = audit(&coord, &["--admin", "alice"]);
    let actions: Vec<(String, bool)> = hers
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or("").to_owned(),
                e["refused"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("task create".to_owned(), false),
            ("token create".to_owned(), false),
            ("agent revoke".to_owned(), true),
            ("admin create".to_owned(), true),
        ],
        "{hers:#?}"
    );
    assert_eq!(hers[0]["subject"], format!("task {task}"));
    assert_eq!(hers[0]["revision"], 1);
    assert!(hers[1]["subject"]
        .as_str()
        .is_some_and(|s| s.starts_with("token ")));
    assert!(hers.iter().all(|e| e["from"] == "127.0.0.1"));
    assert!(hers
        .iter()
        .all(|e| e["cert_sha256"] == hers[0]["cert_sha256"]));
    let about = audit(&coord, &["--about-admin", "alice"]);
    let owner_did: Vec<&str> = about
        .iter()
        .filter(|e| e["admin"] == "owner")
        .map(|e| e["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        owner_did,
        vec!["admin create", "admin create", "admin revoke"]
    );
    // Paging: the latest page, and the older ones by cursor.
    let all = audit(&coord, &[]);
    assert!(all.len() >= 10, "{all:#?}");
    let (ok, page, hint) = coord.ctl(&["audit", "list", "--limit", "3"]);
    assert!(ok);
    assert_eq!(page.lines().count(), 4, "a header and 3 entries: {page}");
    let before = hint
        .split("--before ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("a cursor to older entries");
    let older: Vec<Value> = serde_json::from_str(&coord.ctl_ok(&[
        "audit", "list", "--before", before, "--limit", "2", "-o", "json",
    ]))
    .expect("json");
    assert_eq!(older.len(), 2);
    assert!(older
        .iter()
        .all(|e| e["seq"].as_u64() < before.parse::<u64>().ok()));
    // Viewers and the owner renew themselves; the old credential stops.
    let old_dash = std::fs::read_to_string(&dash).expect("dash's file");
    let said = coord.ctl_as(&dash, &["admin", "renew"]).1;
    assert!(said.contains("renewed admin dash"), "{said}");
    assert_ne!(std::fs::read_to_string(&dash).expect("renewed"), old_dash);
    assert!(
        coord.ctl_as(&dash, &["task", "list"]).0,
        "the new one works"
    );
    let stale = root.path().join("stale.creds");
    std::fs::write(&stale, old_dash).expect("write");
    let err = refused(&coord, &stale, &["task", "list"]);
    assert!(err.contains("refused this credential"), "{err}");
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Whether libfaketime is here; under CI its absence is a failure.
fn faketime_available() -> bool {
    if Path::new(LIBFAKETIME).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must install libfaketime (Debian package faketime) for the clock tests");
    }
    eprintln!("SKIPPED: libfaketime is not installed (apt-get install faketime)");
    false
}

#[test]
fn an_expired_credential_is_refused_with_a_message_that_says_so() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let temp = create(&coord, root.path(), "temp", "operator", &["--ttl", "1h"]);
    // sundialctl itself knows the end from the file.
    let mut text: Value =
        serde_json::from_str(&std::fs::read_to_string(&temp).expect("read")).expect("json");
    let end = text["expires_at"].as_str().expect("an end").to_owned();
    text["expires_at"] = Value::String("2020-01-01T00:00:00Z".into());
    let edited = root.path().join("edited.creds");
    std::fs::write(&edited, text.to_string()).expect("write");
    let err = refused(&coord, &edited, &["task", "list"]);
    assert!(
        err.contains("expired") && err.contains("admin renew temp"),
        "{err}"
    );
    if !faketime_available() {
        return;
    }
    // The coordinator two hours on: its own check, whatever the file says.
    coord.kill9();
    coord.serve_env = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), "+2h".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    coord.restart();
    text["expires_at"] = Value::Null;
    let unmarked = root.path().join("unmarked.creds");
    std::fs::write(&unmarked, text.to_string()).expect("write");
    let err = refused(&coord, &unmarked, &["task", "list"]);
    assert!(
        err.contains("expired at") && err.contains(&end[..16]) && err.contains("admin renew temp"),
        "{err}"
    );
    // The owner's year-long credential still works, and renews temp.
    let renewed = root.path().join("temp-new.creds");
    coord.ctl_ok(&[
        "admin",
        "renew",
        "temp",
        "--out",
        renewed.to_str().expect("utf-8"),
    ]);
    let (ok, _, err) = coord.ctl_as(&renewed, &["token", "list"]);
    assert!(ok, "the renewed credential works: {err}");
}

#[test]
fn the_audit_log_holds_every_committed_change_across_a_kill_9_with_two_admins_at_work() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let files = [
        create(&coord, root.path(), "alice", "operator", &[]),
        create(&coord, root.path(), "bob", "operator", &[]),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let creds = AdminCreds::load(file).expect("credentials");
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Tasks this admin was told were created (and cancelled).
                let mut acked: Vec<(String, bool)> = Vec::new();
                let rt = runtime();
                let Ok(client) = rt.block_on(AdminClient::connect(&creds)) else {
                    return acked;
                };
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let draft = sundial_protocol::wire::TaskDraft {
                        name: Some(format!("w{i}-{n}")),
                        target: sundial_protocol::task::Target::Selector(vec![(
                            "site".into(),
                            "lab".into(),
                        )]),
                        schedule: sundial_protocol::Schedule::at(
                            sundial_protocol::Timestamp::from_millis_saturating(4_000_000_000_000),
                        ),
                        action: sundial_protocol::task::Action::Exec(
                            sundial_protocol::task::ExecSpec {
                                program: "/bin/true".into(),
                                ..Default::default()
                            },
                        ),
                        policies: Default::default(),
                        anchor_at_creation: false,
                        placement: Default::default(),
                    };
                    let id = match rt
                        .block_on(client.request(&AdminRequest::TaskCreate(Box::new(draft))))
                    {
                        Ok(AdminResponse::TaskCreated(id))
                        | Ok(AdminResponse::TaskCreatedWarn { id, .. }) => id,
                        _ => break,
                    };
                    acked.push((id.to_string(), false));
                    if n % 2 == 0 {
                        match rt.block_on(client.request(&AdminRequest::TaskCancel(id))) {
                            Ok(_) => {
                                if let Some(last) = acked.last_mut() {
                                    last.1 = true;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                acked
            })
        })
        .collect();
    // Both at work for a while, then the coordinator dies mid-stride.
    wait_for("both admins to have created tasks", || {
        let log = audit(&coord, &["--since", "1h"]);
        ["alice", "bob"].iter().all(|who| {
            log.iter()
                .filter(|e| e["admin"] == *who && e["action"] == "task create")
                .count()
                >= 5
        })
    });
    coord.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<Vec<(String, bool)>> = workers
        .into_iter()
        .map(|w| w.join().expect("a worker"))
        .collect();
    coord.restart();

    let tasks = coord.json(&["task", "list"]);
    let stored: BTreeMap<String, (u64, bool)> = tasks
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["task_id"].as_str().unwrap_or("").to_owned(),
                (
                    t["revision"].as_u64().unwrap_or(0),
                    t["cancelled"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect();
    let log = audit(&coord, &[]);
    let entries = |action: &str| -> BTreeMap<String, Vec<Value>> {
        let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for e in log.iter().filter(|e| e["action"] == action) {
            let id = e["subject"]
                .as_str()
                .and_then(|s| s.strip_prefix("task "))
                .unwrap_or("")
                .to_owned();
            m.entry(id).or_default().push(e.clone());
        }
        m
    };
    let created = entries("task create");
    let cancelled = entries("task cancel");
    // Every change the store holds has exactly one entry, naming its
    // revision; no entry names a change the store does not hold.
    let created_ids: BTreeSet<&String> = created.keys().collect();
    let stored_ids: BTreeSet<&String> = stored.keys().collect();
    assert_eq!(created_ids, stored_ids, "task creates and their entries");
    for (id, (revision, is_cancelled)) in &stored {
        assert_eq!(created[id].len(), 1, "{id}: one entry");
        match cancelled.get(id) {
            Some(c) => {
                assert!(
                    *is_cancelled,
                    "{id}: an entry for a cancel that did not commit"
                );
                assert_eq!(c.len(), 1);
                assert_eq!(c[0]["revision"].as_u64(), Some(*revision), "{id}");
                assert!(created[id][0]["revision"].as_u64() < Some(*revision));
            }
            None => {
                assert!(!is_cancelled, "{id}: a committed cancel without its entry");
                assert_eq!(created[id][0]["revision"].as_u64(), Some(*revision), "{id}");
            }
        }
    }
    // What each admin was told is stored, with its entry under its name.
    for (who, acks) in ["alice", "bob"].iter().zip(&acked) {
        assert!(acks.len() >= 5, "{who} worked: {}", acks.len());
        for (id, was_cancelled) in acks {
            assert!(
                stored.contains_key(id),
                "{who}'s {id} was acknowledged but lost"
            );
            assert_eq!(created[id][0]["admin"], *who, "{id}");
            if *was_cancelled {
                assert_eq!(cancelled[id][0]["admin"], *who, "{id}");
            }
        }
    }
    let seqs: Vec<u64> = log.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, once each");
}
