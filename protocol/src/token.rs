//! Join tokens: what an operator hands to a device so it can enroll.
//!
//! A token carries a random secret (the coordinator stores only its SHA-256),
//! the SHA-256 fingerprint of the CA certificate and the coordinator's
//! certificate name, so the agent pins the coordinator before it sends
//! anything, as `kubeadm join` does; since `sdj2.`, it also carries the
//! coordinators' addresses (several coordinators share one store), so
//! `sundial-agent join` needs nothing else. Text form: `sdj2.` + base64url
//! (`sdj1.` tokens, without addresses, are still read).

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX_V1: &str = "sdj1.";
const PREFIX: &str = "sdj2.";
/// Bytes of randomness in a token's secret.
pub const SECRET_BYTES: usize = 32;
/// Coordinator addresses an agent may know (a token's, `agent.toml`'s).
pub const COORDINATORS_MAX: usize = 16;
/// The longest coordinator address (a DNS name and a port).
pub const COORDINATOR_BYTES_MAX: usize = 260;

/// A decoded join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub secret: Vec<u8>,
    pub ca_sha256: [u8; 32],
    pub server_name: String,
    /// The coordinators' `HOST:PORT`s (empty in `sdj1.` tokens).
    pub addresses: Vec<String>,
}

/// The token as `sdj1.` wrote it.
#[derive(Deserialize)]
struct TokenV1 {
    secret: Vec<u8>,
    ca_sha256: [u8; 32],
    server_name: String,
}

/// Reads a list of coordinator addresses: `HOST:PORT`, separated by
/// commas or white space, at most [`COORDINATORS_MAX`], duplicates dropped.
pub fn coordinator_list(text: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for a in text.split([',', ' ', '\n', '\t']).filter(|a| !a.is_empty()) {
        check_coordinator(a)?;
        if !out.iter().any(|o| o == a) {
            out.push(a.to_owned());
        }
    }
    if out.is_empty() {
        return Err("no coordinator address given (HOST:PORT)".into());
    }
    if out.len() > COORDINATORS_MAX {
        return Err(format!(
            "{} coordinator addresses: at most {COORDINATORS_MAX}",
            out.len()
        ));
    }
    Ok(out)
}

/// Whether `a` reads as one `HOST:PORT`.
pub fn check_coordinator(a: &str) -> Result<(), String> {
    let port_ok = a
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if a.len() > COORDINATOR_BYTES_MAX || !port_ok || a.chars().any(char::is_control) {
        return Err(format!(
            "`{}` is not a coordinator address: expected HOST:PORT, e.g. coordinator.example.net:7447",
            a.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
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
        let text = text.trim();
        let (v1, body) = match (text.strip_prefix(PREFIX), text.strip_prefix(PREFIX_V1)) {
            (Some(body), _) => (false, body),
            (None, Some(body)) => (true, body),
            _ => return Err(TokenError("it does not start with `sdj2.`")),
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError("bad base64"))?;
        let t: JoinToken = if v1 {
            let t: TokenV1 =
                postcard::from_bytes(&bytes).map_err(|_| TokenError("bad contents"))?;
            JoinToken {
                secret: t.secret,
                ca_sha256: t.ca_sha256,
                server_name: t.server_name,
                addresses: Vec::new(),
            }
        } else {
            postcard::from_bytes(&bytes).map_err(|_| TokenError("bad contents"))?
        };
        if t.secret.len() != SECRET_BYTES {
            return Err(TokenError("bad secret length"));
        }
        if t.addresses.len() > COORDINATORS_MAX
            || t.addresses.iter().any(|a| check_coordinator(a).is_err())
        {
            return Err(TokenError("bad coordinator addresses"));
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

/// Hex digits (either case) as bytes; `None` if they are not.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
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
            addresses: vec!["c1.example.net:7447".into(), "10.0.0.2:7447".into()],
        };
        assert_eq!(JoinToken::decode(&t.encode()), Ok(t.clone()));
        assert!(t.encode().starts_with("sdj2."));
        assert!(!format!("{t:?}").contains('7'));
        for bad in ["", "sdj1.", "sdj1.!!!", "xyz.abc", "sdj1.AAAA", "sdj2.AAAA"] {
            assert!(JoinToken::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_v1_token_is_still_read_without_addresses() {
        #[derive(Serialize)]
        struct V1<'a> {
            secret: &'a [u8],
            ca_sha256: [u8; 32],
            server_name: &'a str,
        }
        let bytes = postcard::to_allocvec(&V1 {
            secret: &[3; SECRET_BYTES],
            ca_sha256: [4; 32],
            server_name: "sundial-coordinator",
        })
        .expect("encodes");
        let text = format!(
            "sdj1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        let t = JoinToken::decode(&text).expect("a v1 token decodes");
        assert_eq!(t.secret, vec![3; SECRET_BYTES]);
        assert!(t.addresses.is_empty());
    }

    #[test]
    fn coordinator_lists_are_checked_and_bounded() {
        assert_eq!(
            coordinator_list("a:1, b:2,a:1").expect("valid"),
            vec!["a:1".to_string(), "b:2".to_string()]
        );
        assert!(coordinator_list("").is_err());
        assert!(coordinator_list("hostonly").is_err());
        assert!(coordinator_list("h:0").is_err());
        assert!(coordinator_list("h:99999").is_err());
        let many: Vec<String> = (0..=COORDINATORS_MAX).map(|i| format!("h{i}:1")).collect();
        assert!(coordinator_list(&many.join(",")).is_err());
    }
}
