//! Encryption at rest of the stores' task definitions and run records.
//!
//! The key is kept outside the store: a key file (`store.key`, mode 0600,
//! beside the store by default), or a systemd credential named
//! [`CREDENTIAL_NAME`] (`LoadCredentialEncrypted=`, which can bind it to
//! the machine's TPM). The file holds a key ring: one key per line as
//! `ID HEX`, the one that encrypts new records marked `current`. Every
//! encrypted record names its key's id, so keys rotate (a new current key
//! is added; old records stay readable by theirs) without rewriting or
//! stopping anything.
//!
//! An encrypted record is `[3][key id: u32 BE][nonce: 12][ciphertext and
//! tag]`: ChaCha20-Poly1305 (ring), the table's name as associated data (a
//! record moved to another table does not open). The nonce is synthetic:
//! an HMAC-SHA256, under a key derived from the record key, of the table
//! and the plaintext (as in SIV). Different records never share a nonce,
//! no random generator can fail a write, and the same record encrypts to
//! the same bytes under one key — which is how the stores tell a record
//! sent twice (after a lost acknowledgement) from a different one, by
//! comparing bytes, as before. The plaintext is the record as stored without encryption, so
//! every record layout keeps its own version. Table keys and indexes (ids,
//! instants, revisions) stay readable, so queries stay as fast.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The key file's name in a data directory.
pub const KEY_FILE: &str = "store.key";
/// The systemd credential a unit may pass the key ring as.
pub const CREDENTIAL_NAME: &str = "sundial-store-key";
/// The first byte of an encrypted record (plain records start with 1 or 2).
pub const RECORD_ENCRYPTED: u8 = 3;
/// The most keys one ring holds.
pub const KEYS_MAX: usize = 64;

const HEADER: &str = "# sundial store key ring: `ID HEX [current]` per line. Keep it private (0600) and back it up apart from the store: without it the store's tasks and runs cannot be read.";
const CHECK_TEXT: &[u8] = b"sundial store key check v1";
const CHECK_TABLE: &str = "key_check";
const HEAD_BYTES: usize = 1 + 4 + NONCE_LEN;

/// A key ring as the key file holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<(u32, [u8; 32])>,
    current: u32,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring(ids {:?}, current {})", self.ids(), self.current)
    }
}

fn random_key(rng: &SystemRandom) -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    rng.fill(&mut key)
        .map_err(|_| "the operating system's random generator failed".to_string())?;
    Ok(key)
}

impl Keyring {
    /// A ring of one new key, id 1.
    pub fn generate() -> Result<Keyring, String> {
        Ok(Keyring {
            keys: vec![(1, random_key(&SystemRandom::new())?)],
            current: 1,
        })
    }

    /// The key file's text read back; errors say which line and why.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let mut keys: Vec<(u32, [u8; 32])> = Vec::new();
        let mut current = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", i + 1);
            let mut parts = line.split_whitespace();
            let id: u32 = parts
                .next()
                .and_then(|p| p.parse().ok())
                .filter(|id| *id > 0)
                .ok_or_else(|| bad("expected a key id (a number from 1)"))?;
            let hex = parts
                .next()
                .ok_or_else(|| bad("expected 64 hex digits after the id"))?;
            let key: [u8; 32] = sundial_protocol::token::unhex(hex)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("the key is not 64 hex digits"))?;
            match parts.next() {
                None => {}
                Some("current") if current.is_none() => current = Some(id),
                Some("current") => return Err(bad("a second key is marked current")),
                Some(w) => return Err(bad(&format!("unexpected `{w}`"))),
            }
            if keys.iter().any(|(k, _)| *k == id) {
                return Err(bad(&format!("key id {id} is given twice")));
            }
            keys.push((id, key));
        }
        if keys.is_empty() {
            return Err("it holds no key".into());
        }
        if keys.len() > KEYS_MAX {
            return Err(format!("{} keys; the most is {KEYS_MAX}", keys.len()));
        }
        let current = current.ok_or("no key is marked current")?;
        Ok(Keyring { keys, current })
    }

    /// The key file's text.
    pub fn to_text(&self) -> String {
        let mut out = format!("{HEADER}\n");
        for (id, key) in &self.keys {
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&format!(
                "{id} {hex}{}\n",
                if *id == self.current { " current" } else { "" }
            ));
        }
        out
    }

    /// Adds a new key (the next id) and, unless `staged`, makes it current;
    /// returns its id. A staged key is known for reading only, so that
    /// several coordinators of one store can all learn it before any of
    /// them writes with it ([`Keyring::activate`]).
    pub fn add(&mut self, staged: bool) -> Result<u32, String> {
        if self.keys.len() >= KEYS_MAX {
            return Err(format!(
                "the ring holds {KEYS_MAX} keys already: remove keys no record uses any more"
            ));
        }
        let id = self.keys.iter().map(|(k, _)| *k).max().unwrap_or(0) + 1;
        self.keys.push((id, random_key(&SystemRandom::new())?));
        if !staged {
            self.current = id;
        }
        Ok(id)
    }

    /// Makes key `id` current.
    pub fn activate(&mut self, id: u32) -> Result<(), String> {
        if !self.keys.iter().any(|(k, _)| *k == id) {
            return Err(format!(
                "the ring holds no key {id} (it holds {:?})",
                self.ids()
            ));
        }
        self.current = id;
        Ok(())
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(k, _)| *k).collect()
    }

    /// The newest key's id.
    pub fn newest(&self) -> u32 {
        self.ids().into_iter().max().unwrap_or(0)
    }
}

/// Where the key ring is: `given` (a flag), else the systemd credential
/// when the unit passes one, else `store.key` in `dir`.
pub fn key_path(dir: &Path, given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_owned();
    }
    if let Some(creds) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = Path::new(&creds).join(CREDENTIAL_NAME);
        if p.exists() {
            return p;
        }
    }
    dir.join(KEY_FILE)
}

/// The ring in `path`; `None` when there is no such file.
pub fn load(path: &Path) -> Result<Option<Keyring>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Keyring::parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: not a store key ring: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `ring` to `path` (mode 0600) in place of what was there, whole
/// or not at all: a new file synced, then renamed over the old one.
pub fn save(path: &Path, ring: &Keyring) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let tmp = path.with_extension("key.new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(ring.to_text().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

struct Loaded {
    ring: Keyring,
    /// Each key's AEAD key and the HMAC key its nonces are made with.
    keys: Vec<(u32, LessSafeKey, hmac::Key)>,
}

fn loaded(ring: Keyring) -> Loaded {
    let keys = ring
        .keys
        .iter()
        .filter_map(|(id, k)| {
            let nonce_key = hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, k),
                b"sundial store nonce key v1",
            );
            UnboundKey::new(&CHACHA20_POLY1305, k).ok().map(|u| {
                (
                    *id,
                    LessSafeKey::new(u),
                    hmac::Key::new(hmac::HMAC_SHA256, nonce_key.as_ref()),
                )
            })
        })
        .collect();
    Loaded { ring, keys }
}

/// Encrypts and decrypts a store's records with a key ring.
pub struct StoreCipher {
    loaded: RwLock<Loaded>,
    /// The file it came from, to reload after a rotation.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for StoreCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreCipher(current key {})", self.current())
    }
}

impl StoreCipher {
    pub fn new(ring: Keyring) -> StoreCipher {
        StoreCipher {
            loaded: RwLock::new(loaded(ring)),
            path: None,
        }
    }

    /// The ring in `path`, made (with one new key) when there is no file
    /// and `create` allows it; remembered for [`StoreCipher::reload`].
    pub fn from_file(path: &Path, create: bool) -> Result<Option<StoreCipher>, String> {
        let ring = match load(path)? {
            Some(r) => r,
            None if create => {
                let r = Keyring::generate()?;
                save(path, &r)?;
                r
            }
            None => return Ok(None),
        };
        Ok(Some(StoreCipher {
            path: Some(path.to_owned()),
            ..StoreCipher::new(ring)
        }))
    }

    pub fn current(&self) -> u32 {
        self.loaded.read().map_or(0, |l| l.ring.current)
    }

    pub fn ids(&self) -> Vec<u32> {
        self.loaded
            .read()
            .map_or_else(|_| Vec::new(), |l| l.ring.ids())
    }

    /// Reads the key file again (after `rotate-key`): `Ok(true)` when the
    /// ring changed. A ring that lost a key of `in_use` is refused and the
    /// old one kept, so nothing stored becomes unreadable.
    pub fn reload(&self, in_use: &[u32]) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let ring =
            load(path)?.ok_or_else(|| format!("{}: the key file is gone", path.display()))?;
        if let Some(lost) = in_use.iter().find(|id| !ring.ids().contains(id)) {
            return Err(format!(
                "{}: the new ring lacks key {lost}, which records use; keeping the old ring",
                path.display()
            ));
        }
        let mut l = self
            .loaded
            .write()
            .map_err(|_| "the key ring lock is poisoned".to_string())?;
        if l.ring == ring {
            return Ok(false);
        }
        *l = loaded(ring);
        Ok(true)
    }

    fn seal_with(&self, id: Option<u32>, table: &str, plain: &[u8]) -> Result<Vec<u8>, String> {
        let l = self
            .loaded
            .read()
            .map_err(|_| "the key ring lock is poisoned".to_string())?;
        let id = id.unwrap_or(l.ring.current);
        let (key, nonce_key) = l
            .keys
            .iter()
            .find(|(k, _, _)| *k == id)
            .map(|(_, k, n)| (k, n))
            .ok_or_else(|| format!("the key ring holds no key {id}"))?;
        let mut ctx = hmac::Context::with_key(nonce_key);
        ctx.update(table.as_bytes());
        ctx.update(&[0]);
        ctx.update(plain);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&ctx.sign().as_ref()[..NONCE_LEN]);
        let mut out = Vec::with_capacity(HEAD_BYTES + plain.len() + 16);
        out.push(RECORD_ENCRYPTED);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(HEAD_BYTES);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(table.as_bytes()),
            &mut body,
        )
        .map_err(|_| "encrypting a record failed".to_string())?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// `plain` (a record as stored without encryption) encrypted with the
    /// current key, for `table`.
    pub fn seal(&self, table: &str, plain: &[u8]) -> Result<Vec<u8>, String> {
        self.seal_with(None, table, plain)
    }

    /// A stored record as plain bytes: decrypted if it is encrypted, as it
    /// is otherwise (a store written before encryption, or being migrated).
    pub fn open<'a>(&self, table: &str, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        if stored.first() != Some(&RECORD_ENCRYPTED) {
            return Ok(Cow::Borrowed(stored));
        }
        if stored.len() < HEAD_BYTES + 16 {
            return Err(format!(
                "an encrypted record of {} bytes is cut short",
                stored.len()
            ));
        }
        let id = u32::from_be_bytes([stored[1], stored[2], stored[3], stored[4]]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&stored[5..HEAD_BYTES]);
        let l = self
            .loaded
            .read()
            .map_err(|_| "the key ring lock is poisoned".to_string())?;
        let key = l.keys.iter().find(|(k, _, _)| *k == id).map(|(_, k, _)| k).ok_or_else(|| {
            format!(
                "the record is encrypted with key {id}, which the key ring does not hold (it holds {:?})",
                l.ring.ids()
            )
        })?;
        let mut body = stored[HEAD_BYTES..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(table.as_bytes()),
                &mut body,
            )
            .map_err(|_| {
                format!("the record does not open with key {id} (a wrong key, or altered)")
            })?;
        let n = plain.len();
        body.truncate(n);
        Ok(Cow::Owned(body))
    }

    /// A value that proves, later, that key `id` of a ring is the one a
    /// store was written with.
    pub fn check_value(&self, id: u32) -> Result<Vec<u8>, String> {
        self.seal_with(Some(id), CHECK_TABLE, CHECK_TEXT)
    }

    /// Whether `value` ([`StoreCipher::check_value`]) opens with this ring.
    pub fn verify(&self, value: &[u8]) -> Result<(), String> {
        match self.open(CHECK_TABLE, value)? {
            v if v.as_ref() == CHECK_TEXT => Ok(()),
            _ => Err("the key check does not match".into()),
        }
    }
}

/// `--store-key off`: a store never encrypted kept plain (to measure what
/// encryption costs); refused for an encrypted one.
pub const OFF: &str = "off";

/// The cipher of a store written with the keys of `checks`, from the ring
/// at `key_file` — made when the store has none yet, never in place of a
/// missing one — and checked against every one of them. Reads the store
/// not at all: callers read `checks` before opening it for writing, so an
/// error here leaves it as it was. `Ok(None)`: `key_file` is [`OFF`].
pub fn cipher_for(
    checks: &[(u32, Vec<u8>)],
    key_file: &Path,
) -> Result<Option<StoreCipher>, String> {
    let used: Vec<u32> = checks.iter().map(|(id, _)| *id).collect();
    if key_file == Path::new(OFF) {
        if used.is_empty() {
            return Ok(None);
        }
        return Err(format!(
            "--store-key off: this store is encrypted (keys {used:?}); it cannot be served plain"
        ));
    }
    let cipher = StoreCipher::from_file(key_file, used.is_empty())?.ok_or_else(|| {
        format!(
            "the store is encrypted (keys {used:?}) but there is no key file at {}: restore it from its backup (or give --store-key FILE, or the `{CREDENTIAL_NAME}` systemd credential); nothing was changed",
            key_file.display(),
        )
    })?;
    check_ring(&cipher, checks, key_file)?;
    Ok(Some(cipher))
}

/// A stored record as plain bytes with no cipher: an encrypted one is an
/// error that says what is missing.
pub fn open_plain<'a>(
    cipher: Option<&StoreCipher>,
    table: &str,
    stored: &'a [u8],
) -> Result<Cow<'a, [u8]>, String> {
    match cipher {
        Some(c) => c.open(table, stored),
        None if stored.first() == Some(&RECORD_ENCRYPTED) => Err(format!(
            "the record is encrypted and no store key was given (table `{table}`)"
        )),
        None => Ok(Cow::Borrowed(stored)),
    }
}

/// Checks `checks` (key id, check value) as a store keeps them against the
/// ring, before anything is written: every key the store was written with
/// must be in the ring and be the same key.
pub fn check_ring(
    cipher: &StoreCipher,
    checks: &[(u32, Vec<u8>)],
    key_file: &Path,
) -> Result<(), String> {
    for (id, value) in checks {
        if !cipher.ids().contains(id) {
            return Err(format!(
                "the store was written with key {id}, which {} does not hold (it holds {:?}): give the key file the store was written with (--store-key, or the `{CREDENTIAL_NAME}` systemd credential)",
                key_file.display(),
                cipher.ids()
            ));
        }
        cipher.verify(value).map_err(|_| {
            format!(
                "key {id} in {} is not the key this store was written with: give the right key file (nothing was changed)",
                key_file.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_name_their_key() {
        let mut ring = Keyring::generate().expect("ring");
        let c = StoreCipher::new(ring.clone());
        let sealed = c.seal("runs", b"\x01hello output").expect("seal");
        assert_eq!(sealed[0], RECORD_ENCRYPTED);
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(
            c.open("runs", &sealed).expect("open").as_ref(),
            b"\x01hello output"
        );
        // Another table, a flipped bit, a cut record: refused.
        assert!(c.open("tasks", &sealed).is_err());
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(c.open("runs", &bad).is_err());
        assert!(c.open("runs", &sealed[..10]).is_err());
        // Plain records pass as they are.
        assert_eq!(
            c.open("runs", b"\x01plain").expect("plain").as_ref(),
            b"\x01plain"
        );
        assert!(open_plain(None, "runs", &sealed).is_err());

        // Rotation: new records use key 2, old ones still open.
        ring.add(false).expect("add");
        let c2 = StoreCipher::new(ring.clone());
        assert_eq!(c2.current(), 2);
        let newer = c2.seal("runs", b"\x01newer").expect("seal");
        assert_eq!(&newer[1..5], &2u32.to_be_bytes());
        assert_eq!(
            c2.open("runs", &sealed).expect("old").as_ref(),
            b"\x01hello output"
        );
        // A ring without key 1 cannot read key 1's records, and says so.
        let other = StoreCipher::new(Keyring::generate().expect("ring"));
        let e = other.open("runs", &sealed).expect_err("wrong key");
        assert!(e.contains("wrong key"), "{e}");
    }

    #[test]
    fn the_key_file_parses_strictly_and_round_trips() {
        let mut ring = Keyring::generate().expect("ring");
        ring.add(true).expect("staged");
        assert_eq!(ring.current(), 1);
        let back = Keyring::parse(&ring.to_text()).expect("parses");
        assert_eq!(back, ring);
        ring.activate(2).expect("activate");
        assert_eq!(
            Keyring::parse(&ring.to_text()).expect("parses").current(),
            2
        );
        for (text, says) in [
            ("", "no key"),
            ("1 abcd current", "64 hex"),
            (&format!("1 {} ", "0".repeat(64)), "current"),
            (&format!("x {} current", "0".repeat(64)), "key id"),
            (&format!("1 {0} current\n1 {0}", "0".repeat(64)), "twice"),
        ] {
            let e = Keyring::parse(text).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_check_value_tells_the_right_key_from_a_wrong_one() {
        let c = StoreCipher::new(Keyring::generate().expect("ring"));
        let check = c.check_value(1).expect("check");
        assert!(check_ring(&c, &[(1, check.clone())], Path::new("k")).is_ok());
        let wrong = StoreCipher::new(Keyring::generate().expect("ring"));
        let e = check_ring(&wrong, &[(1, check.clone())], Path::new("k")).expect_err("wrong");
        assert!(e.contains("not the key"), "{e}");
        let e = check_ring(&c, &[(7, check)], Path::new("k")).expect_err("missing");
        assert!(e.contains("key 7"), "{e}");
    }

    #[test]
    fn a_saved_ring_is_private_and_reloads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_FILE);
        let c = StoreCipher::from_file(&path, true)
            .expect("made")
            .expect("some");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!c.reload(&[1]).expect("unchanged"));
        let mut ring = load(&path).expect("load").expect("some");
        ring.add(false).expect("add");
        save(&path, &ring).expect("save");
        assert!(c.reload(&[1]).expect("changed"));
        assert_eq!(c.current(), 2);
        // A ring that dropped a key in use is refused; the old one stays.
        save(&path, &Keyring::generate().expect("ring")).expect("save");
        assert!(c.reload(&[1, 2]).is_err());
        assert_eq!(c.current(), 2);
    }
}
