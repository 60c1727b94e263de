//! The data directory: made private, the store checked present, opened
//! (waiting briefly for a `status` reading to let go).

use super::*;

/// Creates `dir` (and its parents) readable by the agent's user only, as it
/// holds the agent's key and the tasks' environments. An existing directory
/// keeps the mode its owner gave it.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    sundial_net::private::create_private_dir(dir).map_err(|source| AgentError::DataDir {
        path: dir.to_owned(),
        source,
    })
}

/// Makes a file readable by its owner only (best effort: a read-only
/// filesystem or another owner leaves it as it is).
pub fn restrict_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// The (device, inode) of a file, to notice it being deleted or replaced.
pub(super) fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Refuses to start on a missing or empty store when the agent's
/// certificate says it was enrolled (a fresh store would silently drop its
/// tasks and unsynced records).
pub(super) fn check_store_present(dir: &Path) -> Result<(), AgentError> {
    if !dir.join(session::CERT_FILE).exists() {
        return Ok(());
    }
    let store = store_path(dir);
    let what = match std::fs::metadata(&store) {
        Ok(m) if m.len() == 0 => "empty",
        Ok(_) => return Ok(()),
        Err(_) => "missing",
    };
    Err(AgentError::StoreLost {
        store,
        dir: dir.to_owned(),
        what,
    })
}

/// How long the agent waits for another process (a `status` reading) to
/// let go of its store before concluding another agent is running.
pub(super) const STORE_BUSY_WAIT_MS: u64 = 5_000;

pub(super) async fn open_store<T>(
    path: &Path,
    check: impl Fn(&[(u32, Vec<u8>)]) -> Result<T, String>,
) -> Result<(AgentStore, T), AgentError> {
    let mut waited = 0;
    loop {
        match AgentStore::open_checked(path, &check) {
            Err(e) if e.is_already_open() && waited < STORE_BUSY_WAIT_MS => {
                if waited == 0 {
                    tracing::warn!(store = %path.display(), "the store is in use by another process (another sundial-agent on this data directory, or a `status` reading); waiting up to {} s", STORE_BUSY_WAIT_MS / 1000);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                waited += 100;
            }
            Err(e) if e.is_already_open() => return Err(AgentError::Busy(path.to_owned())),
            other => return Ok(other?),
        }
    }
}
