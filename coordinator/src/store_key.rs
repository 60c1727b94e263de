//! The coordinator's store encrypted at rest (see `sundial_net::at_rest`):
//! its key ring found and checked against the store, plain records
//! migrated, and the ring reloaded after `rotate-key`. Works on both
//! stores: the checks are kept as a setting, so coordinators sharing one
//! PostgreSQL database check their key files against the same record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sundial_core::coord_store::{CoordStore, StoreError};
use sundial_net::at_rest::{self, StoreCipher};

/// The setting that holds `(key id, check value)` of every key records
/// were written with: `ID:HEX,ID:HEX`.
const CHECKS_SETTING: &str = "store_key_checks";
/// The setting saying every plain record was encrypted.
const ENCRYPTED_SETTING: &str = "store_records_encrypted";

/// A store whose records can be encrypted.
pub trait Encryptable: CoordStore {
    fn set_cipher(&mut self, cipher: Arc<StoreCipher>);
    fn encrypt_plain_records(&self) -> Result<u64, StoreError>;
    /// After plain records were encrypted: drop what the store can of
    /// their old copies.
    fn compact(&mut self) {}
}

impl Encryptable for crate::store::CoordinatorStore {
    fn set_cipher(&mut self, cipher: Arc<StoreCipher>) {
        crate::store::CoordinatorStore::set_cipher(self, cipher)
    }
    fn encrypt_plain_records(&self) -> Result<u64, StoreError> {
        crate::store::CoordinatorStore::encrypt_plain_records(self)
    }
    fn compact(&mut self) {
        crate::store::CoordinatorStore::compact(self)
    }
}

impl Encryptable for crate::pg::PgStore {
    fn set_cipher(&mut self, cipher: Arc<StoreCipher>) {
        crate::pg::PgStore::set_cipher(self, cipher)
    }
    fn encrypt_plain_records(&self) -> Result<u64, StoreError> {
        crate::pg::PgStore::encrypt_plain_records(self)
    }
}

/// The setting that holds the key checks (for [`prepare`], read before
/// the store is opened for writing).
pub const CHECKS_KEY: &str = CHECKS_SETTING;

fn checks(store: &dyn CoordStore) -> Result<Vec<(u32, Vec<u8>)>, String> {
    parse_checks(store.setting(CHECKS_SETTING).map_err(|e| e.to_string())?)
}

/// The checks as the setting holds them.
pub fn parse_checks(text: Option<String>) -> Result<Vec<(u32, Vec<u8>)>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, hex) = p
                .split_once(':')
                .ok_or_else(|| format!("the store's key checks are malformed: `{p}`"))?;
            let id: u32 = id
                .parse()
                .map_err(|_| format!("the store's key checks are malformed: `{p}`"))?;
            Ok((
                id,
                sundial_protocol::token::unhex(hex)
                    .ok_or("the store's key checks are malformed")?,
            ))
        })
        .collect()
}

/// The key ids records of this store were written with.
pub fn key_ids(store: &dyn CoordStore) -> Result<Vec<u32>, String> {
    Ok(checks(store)?.into_iter().map(|(id, _)| id).collect())
}

/// Records the check of `cipher`'s current key, if the store lacks it.
pub fn note_current_key(store: &dyn CoordStore, cipher: &StoreCipher) -> Result<(), String> {
    let mut all = checks(store)?;
    if all.iter().any(|(id, _)| *id == cipher.current()) {
        return Ok(());
    }
    all.push((cipher.current(), cipher.check_value(cipher.current())?));
    let text = all
        .iter()
        .map(|(id, v)| format!("{id}:{}", sundial_protocol::token::hex(v)))
        .collect::<Vec<_>>()
        .join(",");
    store
        .put_setting(CHECKS_SETTING, &text)
        .map_err(|e| e.to_string())
}

/// The cipher of the key ring at `key_file`, checked against the keys the
/// store was written with (`at_rest::cipher_for`); `Ok(None)`: kept plain
/// ([`OFF`]). Writes nothing to the store: call it before opening the
/// store for writing.
pub fn prepare(
    checks_setting: Option<String>,
    key_file: &Path,
) -> Result<Option<Arc<StoreCipher>>, String> {
    let used = parse_checks(checks_setting)?;
    Ok(at_rest::cipher_for(&used, key_file)?.map(Arc::new))
}

pub use at_rest::OFF;

/// `init`: the key ring made beside the store, so that copies of the data
/// directory share it. The store records its check when it is served.
pub fn make_ring(key_file: &Path) -> Result<(), String> {
    StoreCipher::from_file(key_file, true).map(|_| ())
}

/// From now on `store` encrypts with `cipher` ([`prepare`]d): the current
/// key's check recorded, and the records stored plain migrated.
pub fn apply(
    store: &mut impl Encryptable,
    cipher: &Arc<StoreCipher>,
    key_file: &Path,
) -> Result<(), String> {
    store.set_cipher(Arc::clone(cipher));
    note_current_key(store, cipher)?;
    if store
        .setting(ENCRYPTED_SETTING)
        .map_err(|e| e.to_string())?
        .is_none()
    {
        let moved = store.encrypt_plain_records().map_err(|e| e.to_string())?;
        store
            .put_setting(ENCRYPTED_SETTING, "1")
            .map_err(|e| e.to_string())?;
        if moved > 0 {
            tracing::info!(records = moved, key_file = %key_file.display(), "encrypted the records stored before encryption");
            store.compact();
        }
    }
    Ok(())
}

/// [`prepare`] and [`apply`] on a store already open; `None`: kept plain
/// ([`OFF`]).
pub fn encrypt(
    store: &mut impl Encryptable,
    key_file: &Path,
) -> Result<Option<Arc<StoreCipher>>, String> {
    let cipher = prepare(
        store.setting(CHECKS_SETTING).map_err(|e| e.to_string())?,
        key_file,
    )?;
    if let Some(c) = &cipher {
        apply(store, c, key_file)?;
    }
    Ok(cipher)
}

/// Marks every record of `store` as encrypted (a store filled through a
/// cipher from the start, as `import` fills one).
pub fn mark_encrypted(store: &dyn CoordStore) -> Result<(), String> {
    store
        .put_setting(ENCRYPTED_SETTING, "1")
        .map_err(|e| e.to_string())
}

/// Reads the key ring again if it changed (after `rotate-key`); new
/// records use its current key. A ring that lost a key in use is refused.
pub fn reload(store: &dyn CoordStore, cipher: &StoreCipher, key_file: &Path) {
    let in_use = match key_ids(store) {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "reading the store's key ids failed");
            return;
        }
    };
    match cipher.reload(&in_use) {
        Ok(false) => {}
        Ok(true) => match note_current_key(store, cipher) {
            Ok(()) => {
                tracing::info!(key = cipher.current(), key_file = %key_file.display(), "store key ring reloaded: new records use key {}", cipher.current())
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording the new store key's check failed; retried at the next change")
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "the store key ring could not be reloaded; the old one stays in use")
        }
    }
}

/// `rotate-key`: a new key added to the ring at `path`; made current
/// unless `stage` (then `activate` makes the newest current, once every
/// coordinator sharing the store has the file). Returns a line to print.
pub fn rotate(path: &Path, stage: bool, activate: bool) -> Result<String, String> {
    let mut ring = at_rest::load(path)?.ok_or_else(|| {
        format!(
            "{}: no key ring here (`serve` makes it at its first start; give --store-key FILE if it is elsewhere)",
            path.display()
        )
    })?;
    let old = ring.current();
    let line = if activate {
        let newest = ring.newest();
        if newest == old {
            return Err(format!(
                "key {old} is current already: nothing staged to activate"
            ));
        }
        ring.activate(newest)?;
        format!("{}: key {newest} made current (was {old})", path.display())
    } else {
        let id = ring.add(stage)?;
        if stage {
            format!(
                "{}: key {id} added, not current yet: copy this file to every coordinator of the store, then run `rotate-key --activate` on each",
                path.display()
            )
        } else {
            format!(
                "{}: key {id} added and made current (was {old})",
                path.display()
            )
        }
    };
    at_rest::save(path, &ring)?;
    Ok(format!(
        "{line}; a running coordinator reads the ring again within 5 s; keep the older keys: records written with them stay readable by them"
    ))
}

/// The key ring of a coordinator's data directory.
pub fn key_file(dir: &Path, given: Option<&Path>) -> PathBuf {
    at_rest::key_path(dir, given)
}
