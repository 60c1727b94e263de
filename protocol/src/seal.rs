//! Sealed secrets: environment values encrypted on the operator's side to
//! one agent's public key, so that the coordinator stores and forwards
//! ciphertext it cannot read.
//!
//! HPKE (RFC 9180) in base mode with DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256 and ChaCha20-Poly1305, from the `hpke` crate: `ring`, which
//! the rest of Sundial uses, offers only ephemeral key agreement. The
//! agent's sealing key is its own X25519 key pair, made on the device at
//! `join` beside the certificate's signing key (never that key reused) and
//! published in enrollment and in every Hello.
//!
//! A sealed value is bound to the agent id and the variable's name (HPKE's
//! associated data): a coordinator cannot move it to another agent or give
//! it another name without the agent's open failing.
//!
//! No I/O: the randomness a seal needs comes in as a seed from the caller.

use std::fmt;

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};

use crate::task::AgentId;

type Kem = X25519HkdfSha256;

/// The length of a sealing public key and of the seed of a key pair.
pub const SEAL_KEY_BYTES: usize = 32;
/// The longest secret name (an environment variable's name).
pub const SECRET_NAME_BYTES_MAX: usize = 128;
/// The largest secret value.
pub const SECRET_VALUE_BYTES_MAX: usize = 16 * 1024;
/// The most sealed variables of one task.
pub const SEALED_ENV_MAX: usize = 32;
/// The most agents one secret is sealed to (one task).
pub const SEALED_RECIPIENTS_MAX: usize = 4096;
/// The most bytes of ciphertext one task carries, all secrets and agents.
pub const SEALED_BYTES_MAX: usize = 1024 * 1024;

/// HPKE's `info`: names what the key is used for.
const INFO: &[u8] = b"sundial sealed env v1";
/// The encapsulated key, then the ciphertext and its 16-byte tag.
const ENC_BYTES: usize = 32;
const TAG_BYTES: usize = 16;

/// The smallest and largest sealed value.
pub const SEALED_VALUE_BYTES_MIN: usize = ENC_BYTES + TAG_BYTES;
pub const SEALED_VALUE_BYTES_MAX: usize = ENC_BYTES + TAG_BYTES + SECRET_VALUE_BYTES_MAX;

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealing public key (expected {SEAL_KEY_BYTES} bytes)")]
    BadPublicKey,
    #[error("the sealing key file does not hold a key (expected {SEAL_KEY_BYTES} bytes)")]
    BadKeyFile,
    #[error("the secret is {0} bytes; the most is {SECRET_VALUE_BYTES_MAX}")]
    TooLarge(usize),
    #[error("the sealed value is malformed ({0} bytes)")]
    Malformed(usize),
    /// The wrong key, another agent's or another name's value, or tampering.
    #[error("the sealed value does not open with this agent's key (sealed to another agent, for another name, or altered)")]
    DoesNotOpen,
    #[error("sealing failed")]
    Seal,
}

/// An agent's public sealing key (X25519), as published to operators.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SealPublicKey(pub [u8; SEAL_KEY_BYTES]);

impl SealPublicKey {
    /// A short fingerprint for people: the first 8 bytes of its SHA-256, hex.
    pub fn fingerprint(&self) -> String {
        crate::token::sha256(&self.0)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn hpke(&self) -> Result<<Kem as hpke::Kem>::PublicKey, SealError> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(&self.0).map_err(|_| SealError::BadPublicKey)
    }
}

impl fmt::Debug for SealPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealPublicKey({})", self.fingerprint())
    }
}

impl fmt::Display for SealPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// An agent's sealing key pair, derived from a 32-byte seed (the content
/// of its key file). Its `Debug` shows only the public key.
#[derive(Clone)]
pub struct SealKeyPair {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: SealPublicKey,
}

impl fmt::Debug for SealKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKeyPair({})", self.public.fingerprint())
    }
}

impl SealKeyPair {
    /// The key pair of `seed` (32 random bytes, kept secret).
    pub fn from_seed(seed: &[u8]) -> Result<SealKeyPair, SealError> {
        if seed.len() != SEAL_KEY_BYTES {
            return Err(SealError::BadKeyFile);
        }
        let (private, public) = Kem::derive_keypair(seed);
        let mut bytes = [0u8; SEAL_KEY_BYTES];
        public.write_exact(&mut bytes);
        Ok(SealKeyPair {
            private,
            public: SealPublicKey(bytes),
        })
    }

    pub fn public(&self) -> SealPublicKey {
        self.public
    }
}

/// A variable's value sealed to each agent it is for: `(agent, sealed)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedEnv {
    pub name: String,
    pub sealed: Vec<(AgentId, Vec<u8>)>,
}

impl SealedEnv {
    /// The value sealed to `agent`, if any.
    pub fn for_agent(&self, agent: AgentId) -> Option<&[u8]> {
        self.sealed
            .iter()
            .find(|(a, _)| *a == agent)
            .map(|(_, s)| s.as_slice())
    }

    /// The agents it is sealed to.
    pub fn recipients(&self) -> impl Iterator<Item = AgentId> + '_ {
        self.sealed.iter().map(|(a, _)| *a)
    }
}

fn aad(agent: AgentId, name: &str) -> Vec<u8> {
    let mut aad = agent.0.to_be_bytes().to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Seals `value` of the variable `name` to `agent`'s key. `seed`: 32 fresh
/// random bytes (the ephemeral key's), never reused.
pub fn seal(
    to: &SealPublicKey,
    agent: AgentId,
    name: &str,
    value: &[u8],
    seed: [u8; 32],
) -> Result<Vec<u8>, SealError> {
    if value.len() > SECRET_VALUE_BYTES_MAX {
        return Err(SealError::TooLarge(value.len()));
    }
    let pk = to.hpke()?;
    let mut rng = SeedRng::new(seed);
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        INFO,
        value,
        &aad(agent, name),
        &mut rng,
    )
    .map_err(|_| SealError::Seal)?;
    let mut out = vec![0u8; ENC_BYTES];
    enc.write_exact(&mut out);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a value sealed to `agent` for the variable `name`.
pub fn open(
    key: &SealKeyPair,
    agent: AgentId,
    name: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    if !(SEALED_VALUE_BYTES_MIN..=SEALED_VALUE_BYTES_MAX).contains(&sealed.len()) {
        return Err(SealError::Malformed(sealed.len()));
    }
    let (enc, ct) = sealed.split_at(ENC_BYTES);
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc)
        .map_err(|_| SealError::Malformed(sealed.len()))?;
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        &key.private,
        &enc,
        INFO,
        ct,
        &aad(agent, name),
    )
    .map_err(|_| SealError::DoesNotOpen)
}

/// Whether `name` may name an environment variable: ASCII letters, digits
/// and `_`, not starting with a digit.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= SECRET_NAME_BYTES_MAX
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why a task's sealed variables cannot be accepted (from an admin or a
/// coordinator: every field checked); `None` when they are within bounds.
/// `plain`: the task's plain environment, whose names they must not repeat.
pub fn refusal(env: &[SealedEnv], plain: &[(String, String)]) -> Option<String> {
    if env.len() > SEALED_ENV_MAX {
        return Some(format!(
            "{} sealed variables; the most is {SEALED_ENV_MAX}",
            env.len()
        ));
    }
    let mut bytes = 0usize;
    for (i, e) in env.iter().enumerate() {
        if !valid_env_name(&e.name) {
            return Some(format!(
                "`{}` is not an environment variable name (letters, digits and _, not starting with a digit, at most {SECRET_NAME_BYTES_MAX} bytes)",
                e.name.chars().take(40).collect::<String>()
            ));
        }
        if env[..i].iter().any(|o| o.name == e.name) {
            return Some(format!("the sealed variable {} is given twice", e.name));
        }
        if plain.iter().any(|(k, _)| *k == e.name) {
            return Some(format!(
                "{} is both a plain and a sealed variable: give it once",
                e.name
            ));
        }
        if e.sealed.len() > SEALED_RECIPIENTS_MAX {
            return Some(format!(
                "{} is sealed to {} agents; the most is {SEALED_RECIPIENTS_MAX} (split the task by label)",
                e.name,
                e.sealed.len()
            ));
        }
        let mut agents: Vec<AgentId> = e.recipients().collect();
        agents.sort_unstable();
        if agents.windows(2).any(|w| w[0] == w[1]) {
            return Some(format!("{} is sealed twice to one agent", e.name));
        }
        for (agent, s) in &e.sealed {
            if !(SEALED_VALUE_BYTES_MIN..=SEALED_VALUE_BYTES_MAX).contains(&s.len()) {
                return Some(format!(
                    "{}'s value sealed to {agent} is {} bytes, not a sealed value",
                    e.name,
                    s.len()
                ));
            }
            bytes = bytes.saturating_add(s.len());
        }
    }
    if bytes > SEALED_BYTES_MAX {
        return Some(format!(
            "the sealed values take {bytes} bytes; the most for one task is {SEALED_BYTES_MAX} (fewer agents per task, or smaller secrets)"
        ));
    }
    None
}

/// A deterministic random stream from one seed (SHA-256 of the seed and a
/// block counter): what HPKE draws its ephemeral key from, so that this
/// crate does no I/O and the caller handles the OS generator's errors.
struct SeedRng {
    seed: [u8; 32],
    block: [u8; 32],
    used: usize,
    counter: u64,
}

impl SeedRng {
    fn new(seed: [u8; 32]) -> SeedRng {
        SeedRng {
            seed,
            block: [0; 32],
            used: 32,
            counter: 0,
        }
    }
}

impl hpke::rand_core::RngCore for SeedRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for byte in dst {
            if self.used == self.block.len() {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(&self.seed);
                ctx.update(&self.counter.to_be_bytes());
                self.block.copy_from_slice(ctx.finish().as_ref());
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }
}

impl hpke::rand_core::CryptoRng for SeedRng {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: u8) -> SealKeyPair {
        SealKeyPair::from_seed(&[n; 32]).expect("32 bytes")
    }

    #[test]
    fn opens_only_for_its_agent_name_and_key() {
        let a1 = pair(1);
        let a2 = pair(2);
        let s = seal(&a1.public(), AgentId(1), "API_KEY", b"hunter2", [7; 32]).expect("seals");
        assert!(!s.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            open(&a1, AgentId(1), "API_KEY", &s).expect("opens"),
            b"hunter2"
        );
        // Another agent's key, another agent id, another name: no.
        assert_eq!(
            open(&a2, AgentId(1), "API_KEY", &s),
            Err(SealError::DoesNotOpen)
        );
        assert_eq!(
            open(&a1, AgentId(2), "API_KEY", &s),
            Err(SealError::DoesNotOpen)
        );
        assert_eq!(
            open(&a1, AgentId(1), "TOKEN", &s),
            Err(SealError::DoesNotOpen)
        );
        // A flipped bit anywhere: no.
        for i in [0, ENC_BYTES, s.len() - 1] {
            let mut t = s.clone();
            t[i] ^= 1;
            assert!(open(&a1, AgentId(1), "API_KEY", &t).is_err(), "bit at {i}");
        }
        assert_eq!(
            open(&a1, AgentId(1), "API_KEY", &s[..10]),
            Err(SealError::Malformed(10))
        );
    }

    #[test]
    fn seeds_differ_so_do_ciphertexts_and_key_pairs_are_stable() {
        let a = pair(3);
        assert_eq!(a.public(), pair(3).public());
        assert_ne!(a.public(), pair(4).public());
        let x = seal(&a.public(), AgentId(3), "K", b"v", [1; 32]).expect("seals");
        let y = seal(&a.public(), AgentId(3), "K", b"v", [2; 32]).expect("seals");
        assert_ne!(x, y);
        assert!(SealKeyPair::from_seed(&[0; 31]).is_err());
        let big = vec![0u8; SECRET_VALUE_BYTES_MAX + 1];
        assert!(matches!(
            seal(&a.public(), AgentId(3), "K", &big, [1; 32]),
            Err(SealError::TooLarge(_))
        ));
    }

    #[test]
    fn refusals_name_the_problem() {
        let ok = |sealed: Vec<(AgentId, Vec<u8>)>| SealedEnv {
            name: "API_KEY".into(),
            sealed,
        };
        let v = vec![0u8; SEALED_VALUE_BYTES_MIN + 3];
        assert_eq!(refusal(&[ok(vec![(AgentId(1), v.clone())])], &[]), None);
        let bad_name = SealedEnv {
            name: "1X".into(),
            sealed: vec![],
        };
        assert!(refusal(&[bad_name], &[]).is_some_and(|r| r.contains("not an environment")));
        let twice = vec![ok(vec![]), ok(vec![])];
        assert!(refusal(&twice, &[]).is_some_and(|r| r.contains("twice")));
        let plain = [("API_KEY".to_string(), "x".to_string())];
        assert!(refusal(&[ok(vec![])], &plain).is_some_and(|r| r.contains("both")));
        let dup = ok(vec![(AgentId(1), v.clone()), (AgentId(1), v.clone())]);
        assert!(refusal(&[dup], &[]).is_some_and(|r| r.contains("twice to one agent")));
        let short = ok(vec![(AgentId(1), vec![1, 2, 3])]);
        assert!(refusal(&[short], &[]).is_some_and(|r| r.contains("not a sealed value")));
    }
}
