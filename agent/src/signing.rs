//! Ed25519 keys of the fleet: generating them, their one-line files and
//! their short ids. A secret key file is `ferry-fleet-secret-key:` and the
//! base64 32-byte seed; a public key is the base64 32-byte key (what
//! `[fleet] trusted_keys` lists and a bundle manifest names). Signing and
//! verifying manifests is [`crate::fleet::bundle`]'s.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Why a key or key file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {reason}")]
pub struct KeyError {
    /// Secret key or public key.
    pub what: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// A short, stable name for a public key: the first 8 bytes of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    Sha256::digest(key.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random signing key.
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut seed);
    SigningKey::from_bytes(&seed)
}

/// Marks a secret key file, so a public key given by mistake is refused
/// instead of silently signing with a key nobody trusts.
const SECRET_PREFIX: &str = "ferry-fleet-secret-key:";

/// The secret key file text.
pub fn encode_secret(key: &SigningKey) -> String {
    format!("{SECRET_PREFIX}{}\n", B64.encode(key.to_bytes()))
}

/// The public key file text (also what `[fleet] trusted_keys` lists).
pub fn encode_public(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}

fn decode_32(text: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(text.trim()).map_err(|e| KeyError { what, reason: format!("not base64: {e}") })?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| KeyError { what, reason: format!("{} bytes, an ed25519 key has 32", b.len()) })
}

/// Parses a secret key file.
pub fn decode_secret(text: &str) -> Result<SigningKey, KeyError> {
    let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or_else(|| KeyError {
        what: "secret key",
        reason: "not a secret key file from `ferry fleet keygen` (the .key file, not the .pub one)".into(),
    })?;
    Ok(SigningKey::from_bytes(&decode_32(encoded, "secret key")?))
}

/// Parses a public key (base64 of 32 bytes).
pub fn decode_public(text: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&decode_32(text, "public key")?)
        .map_err(|e| KeyError { what: "public key", reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_a_public_key_is_not_taken_for_a_secret_one() {
        let k = generate_key();
        assert_eq!(decode_secret(&encode_secret(&k)).unwrap().to_bytes(), k.to_bytes());
        assert_eq!(decode_public(&encode_public(&k.verifying_key())).unwrap(), k.verifying_key());
        assert!(decode_public("AAAA").is_err());
        let public_as_secret = decode_secret(&encode_public(&k.verifying_key())).unwrap_err().to_string();
        assert!(public_as_secret.contains(".pub"), "{public_as_secret}");
    }
}
