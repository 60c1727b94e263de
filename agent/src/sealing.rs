//! The agent's sealing key: its own X25519 key pair for secrets sealed to
//! it (see `sundial_protocol::seal`), kept as a 32-byte seed in
//! `seal.key` (mode 0600) beside the certificate's key, never that key
//! reused. Made at `join`; an agent enrolled before 0.5 makes it at its
//! first start and publishes it in its next Hello.

use std::path::Path;

use sundial_protocol::seal::{SealKeyPair, SEAL_KEY_BYTES};

/// The key file, in the data directory.
pub const SEAL_KEY_FILE: &str = "seal.key";

/// 32 bytes from the operating system's generator.
pub fn random_seed() -> Result<[u8; 32], String> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| "the operating system's random generator failed".to_string())?;
    Ok(seed)
}

/// Writes a new key file (mode 0600, synced); refuses to replace one.
pub fn create(data_dir: &Path) -> Result<SealKeyPair, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(SEAL_KEY_FILE);
    let seed = random_seed()?;
    let pair = SealKeyPair::from_seed(&seed).map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(&seed)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pair)
}

/// The agent's key pair: read from its file, or made if there is none (an
/// agent enrolled before 0.5). A file that does not hold a key is an
/// error that names the way out; it is never replaced silently, as values
/// sealed to it would stop opening.
pub fn load_or_create(data_dir: &Path) -> Result<SealKeyPair, String> {
    let path = data_dir.join(SEAL_KEY_FILE);
    match std::fs::read(&path) {
        Ok(seed) if seed.len() == SEAL_KEY_BYTES => {
            crate::runtime::restrict_file(&path);
            SealKeyPair::from_seed(&seed).map_err(|e| e.to_string())
        }
        Ok(seed) => Err(format!(
            "{}: {} bytes, not a sealing key ({SEAL_KEY_BYTES}); move it away to make a new key \
             at the next start, then reseal the secrets of this agent's tasks \
             (`sundialctl task reseal`)",
            path.display(),
            seed.len()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = create(data_dir)?;
            tracing::info!(key = %pair.public(), "made this agent's sealing key (it was enrolled before 0.5); it is published in the next session");
            Ok(pair)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
