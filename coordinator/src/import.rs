//! `sundial-coordinator import`: moves a coordinator from its embedded store
//! to PostgreSQL, with nothing lost: settings, admin certificates, agents
//! (revoked ones included), tasks with their ids and revisions, join
//! tokens, the counters (so no id or revision is handed out twice), and
//! every run record; then the counts are compared and the data directory
//! is pointed at the database (`store.url`). The redb file is left where it
//! was, untouched, as the backup of the moment.
//!
//! The database is marked as serving coordinators (the CA's fingerprint)
//! only at the end: an import that failed half-way leaves a database no
//! coordinator serves, and running `import` again starts it afresh.

use std::path::Path;

use sundial_core::coord_store::{
    Agent, CoordStore, JoinToken, Page, RunQuery, StoreError, StoredTask, PAGE_MAX,
};
use sundial_protocol::token::sha256;
use sundial_protocol::wire::AuditQuery;

use crate::pg::{PgOptions, PgStore};
use crate::server::{ServeError, CA_SETTING, STORE_FILE, STORE_URL_FILE};
use crate::store::CoordinatorStore;

/// Runs copied per batch (one statement each on PostgreSQL).
const RUN_BATCH: usize = 5_000;

/// What an import copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    pub admins: usize,
    /// Audit log entries.
    pub audit: usize,
    pub agents: usize,
    pub tasks: usize,
    pub tokens: usize,
    pub runs: u64,
}

fn store_err(e: StoreError) -> ServeError {
    ServeError::Store(e)
}

/// Calls `each` on every item of a listing, a page at a time (memory
/// bounded by a page, whatever is stored).
fn each_page<T, K: Copy>(
    key: impl Fn(&T) -> K,
    mut page: impl FnMut(Option<K>) -> Result<Vec<T>, StoreError>,
    mut each: impl FnMut(&T) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut after = None;
    loop {
        let got = page(after)?;
        for item in &got {
            each(item)?;
        }
        if got.len() < PAGE_MAX {
            return Ok(());
        }
        after = got.last().map(&key);
    }
}

/// Copies the embedded store of `dir` into the database `opts` names;
/// `progress` hears how many runs were copied so far.
pub fn import(
    dir: &Path,
    opts: &PgOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Imported, ServeError> {
    if dir.join(STORE_URL_FILE).exists() {
        return Err(ServeError::Tls(format!(
            "{} already uses PostgreSQL ({STORE_URL_FILE}); there is nothing to import",
            dir.display()
        )));
    }
    if !crate::server::is_initialized(dir) {
        return Err(ServeError::NotInitialized(dir.to_owned()));
    }
    let pki = crate::pki::Pki::load(dir)?;
    let mut from = match CoordinatorStore::open(&dir.join(STORE_FILE)) {
        Ok(s) => s,
        Err(StoreError::Locked(_)) => return Err(ServeError::Busy(dir.join(STORE_FILE))),
        Err(e) => return Err(ServeError::Store(e)),
    };
    // The same key ring reads the embedded store and encrypts the copy.
    let key_file = crate::store_key::key_file(dir, None);
    let cipher = crate::store_key::encrypt(&mut from, &key_file).map_err(ServeError::Key)?;
    let mut to = PgStore::open(opts).map_err(store_err)?;
    if let Some(c) = &cipher {
        to.set_cipher(c.clone());
    }
    if to.setting(CA_SETTING).map_err(store_err)?.is_some() {
        return Err(ServeError::Tls(format!(
            "the database at {} already serves coordinators: import only into a new database",
            crate::pg::redact(&opts.url)
        )));
    }
    // Not marked: nobody serves it; whatever an earlier attempt left goes.
    to.wipe().map_err(store_err)?;
    if let Some(c) = &cipher {
        crate::store_key::note_current_key(&to, c).map_err(ServeError::Key)?;
        crate::store_key::mark_encrypted(&to).map_err(ServeError::Key)?;
    }

    let mut done = Imported::default();
    for key in ["advertise", "server_name"] {
        if let Some(v) = from.setting(key).map_err(store_err)? {
            to.put_setting(key, &v).map_err(store_err)?;
        }
    }
    // Live admins (a revoked one's certificate stays revoked: it is not
    // carried over), then the audit log as it is.
    for a in sundial_core::coord::admin::all_admins(&from)
        .map_err(store_err)?
        .into_iter()
        .filter(|a| a.revoked_at.is_none())
    {
        to.create_admin(&a, None).map_err(store_err)?;
        done.admins += 1;
    }
    let mut after = None;
    loop {
        let page = from
            .audit(&AuditQuery {
                after: Some(after.unwrap_or(0)),
                limit: PAGE_MAX as u32,
                ..AuditQuery::default()
            })
            .map_err(store_err)?;
        for e in &page.entries {
            to.append_audit(e).map_err(store_err)?;
            done.audit += 1;
        }
        after = page.entries.last().map(|e| e.seq);
        if !page.more || after.is_none() {
            break;
        }
    }
    each_page(
        |a: &Agent| a.id,
        |after| from.agents(after, PAGE_MAX),
        |a| {
            done.agents += 1;
            to.import_agent(a)
        },
    )
    .map_err(store_err)?;
    each_page(
        |t: &StoredTask| t.spec.id,
        |after| from.tasks(after, PAGE_MAX),
        |t| {
            done.tasks += 1;
            to.import_task(t)
        },
    )
    .map_err(store_err)?;
    each_page(
        |t: &JoinToken| t.secret_sha256,
        |after| from.tokens(after, PAGE_MAX),
        |t| {
            done.tokens += 1;
            to.import_token(t)
        },
    )
    .map_err(store_err)?;
    let (revision, next_task, next_agent) = from.counters().map_err(store_err)?;
    to.import_counters(revision, next_task, next_agent)
        .map_err(store_err)?;

    // Runs, oldest first, a page at a time: memory bounded whatever is stored.
    let total = from.run_count().map_err(store_err)?;
    let mut page = Page::Latest;
    loop {
        let got = from
            .runs(&RunQuery {
                task: None,
                agent: None,
                since: Some(sundial_protocol::Timestamp::MIN),
                limit: RUN_BATCH,
                page,
                forward_from_since: true,
            })
            .map_err(store_err)?;
        if got.unreadable > 0 {
            return Err(ServeError::Store(StoreError::Corrupt(format!(
                "{} stored run records cannot be read; repair or restore {} first",
                got.unreadable,
                dir.join(STORE_FILE).display()
            ))));
        }
        let conflicts = to.put_runs(&got.runs).map_err(store_err)?;
        if !conflicts.is_empty() {
            return Err(ServeError::Store(StoreError::Conflict(format!(
                "{} runs were stored twice with different records",
                conflicts.len()
            ))));
        }
        done.runs += got.runs.len() as u64;
        progress(done.runs, total);
        match (got.more, got.last) {
            (true, Some(last)) => page = Page::After(last),
            _ => break,
        }
    }
    let stored = to.all_runs_count_exact().map_err(store_err)?;
    if stored != total || done.runs != total {
        return Err(ServeError::Store(StoreError::Conflict(format!(
            "the embedded store holds {total} runs, {} were read and the database holds {stored}: not switched over",
            done.runs
        ))));
    }
    // The database now serves this coordinator set, and the directory
    // points at it.
    to.put_setting(
        CA_SETTING,
        &sundial_protocol::token::hex(&sha256(pki.ca_der.as_ref())),
    )
    .map_err(store_err)?;
    std::fs::write(dir.join(STORE_URL_FILE), format!("{}\n", opts.url))
        .map_err(|e| ServeError::Tls(format!("cannot write {STORE_URL_FILE}: {e}")))?;
    Ok(done)
}
