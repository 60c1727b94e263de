//! Join tokens: what an operator hands to a device so it can enroll.
//!
//! A token carries a random secret (the coordinator stores only its SHA-256),
//! the SHA-256 fingerprint of the CA certificate and the coordinator's
//! certificate name, so the agent pins the coordinator before it sends
//! anything, as `kubeadm join` does. Text form: `sdj1.` + base64url.

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "sdj1.";
/// Bytes of randomness in a token's secret.
pub const SECRET_BYTES: usize = 32;

/// A decoded join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub secret: Vec<u8>,
    pub ca_sha256: [u8; 32],
    pub server_name: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("JoinToken")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a token's text is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Sundial join token ({0}); create one with `sundialctl token create`")]
pub struct TokenError(&'static str);

impl JoinToken {
    pub fn encode(&self) -> String {
        // Invariant: postcard encodes this plain struct.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenError("it does not start with `sdj1.`"))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError("bad base64"))?;
        let t: JoinToken = postcard::from_bytes(&bytes).map_err(|_| TokenError("bad contents"))?;
        if t.secret.len() != SECRET_BYTES {
            return Err(TokenError("bad secret length"));
        }
        Ok(t)
    }
}

/// SHA-256 of some bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let t = JoinToken {
            secret: vec![7; SECRET_BYTES],
            ca_sha256: [9; 32],
            server_name: "sundial-coordinator".into(),
        };
        assert_eq!(JoinToken::decode(&t.encode()), Ok(t.clone()));
        assert!(!format!("{t:?}").contains('7'));
        for bad in ["", "sdj1.", "sdj1.!!!", "xyz.abc", "sdj1.AAAA"] {
            assert!(JoinToken::decode(bad).is_err(), "{bad}");
        }
    }
}
