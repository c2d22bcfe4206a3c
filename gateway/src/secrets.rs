//! Provider credentials at rest: AES-256-GCM under a master key from the environment.
//!
//! The master key is 32 bytes, given as base64 or hex in `TOLLGATE_MASTER_KEY`. Each
//! credential gets a fresh 96-bit nonce, and its name is bound as associated data so a
//! ciphertext cannot be moved to another credential's row. A short fingerprint of the master
//! key is stored beside each ciphertext so a wrong key is reported as such, not as garbage.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::StoredCredential;

/// Environment variable holding the master key.
pub const MASTER_KEY_ENV: &str = "TOLLGATE_MASTER_KEY";
/// Environment variable holding the previous master key during a rotation.
pub const OLD_MASTER_KEY_ENV: &str = "TOLLGATE_MASTER_KEY_OLD";

/// Master-key and credential failures. Messages never contain key material.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretsError {
    #[error("{var} must be 32 bytes encoded as base64 or hex (got {got} bytes)")]
    BadLength { var: String, got: usize },
    #[error("{var} is neither base64 nor hex")]
    BadEncoding { var: String },
    #[error("credential `{0}` was encrypted under a different master key")]
    WrongKey(String),
    #[error("credential `{0}` cannot be decrypted (corrupted or tampered with)")]
    Corrupt(String),
    #[error("a master key ({MASTER_KEY_ENV}) is required to store or use provider credentials")]
    Missing,
}

/// The key that encrypts provider credentials.
pub struct MasterKey {
    cipher: Aes256Gcm,
    fingerprint: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint)
    }
}

impl MasterKey {
    /// Parses base64 or hex text; `var` names the source in errors.
    pub fn parse(text: &str, var: &str) -> Result<MasterKey, SecretsError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|_| SecretsError::BadEncoding {
                var: var.to_string(),
            })?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
                .map_err(|_| SecretsError::BadEncoding {
                    var: var.to_string(),
                })?
        };
        if bytes.len() != 32 {
            return Err(SecretsError::BadLength {
                var: var.to_string(),
                got: bytes.len(),
            });
        }
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| SecretsError::BadLength {
            var: var.to_string(),
            got: bytes.len(),
        })?;
        let digest = Sha256::new()
            .chain_update(b"tollgate-master-key:")
            .chain_update(&bytes)
            .finalize();
        Ok(MasterKey {
            cipher,
            fingerprint: hex::encode(&digest[..8]),
        })
    }

    /// The key in `var`, if set.
    pub fn from_env(var: &str) -> Result<Option<MasterKey>, SecretsError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => MasterKey::parse(&v, var).map(Some),
            _ => Ok(None),
        }
    }

    /// A fresh random key, base64-encoded (for `tollgate credentials generate-master-key`).
    pub fn generate_encoded() -> String {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Encrypts `secret` as credential `name` of `provider`.
    pub fn encrypt(
        &self,
        name: &str,
        provider: &str,
        secret: &str,
    ) -> Result<StoredCredential, SecretsError> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Corrupt(name.to_string()))?;
        Ok(StoredCredential {
            name: name.to_string(),
            provider: provider.to_string(),
            nonce: nonce.to_vec(),
            ciphertext,
            key_fingerprint: self.fingerprint.clone(),
        })
    }

    /// Decrypts a stored credential.
    pub fn decrypt(&self, c: &StoredCredential) -> Result<String, SecretsError> {
        if c.key_fingerprint != self.fingerprint {
            return Err(SecretsError::WrongKey(c.name.clone()));
        }
        if c.nonce.len() != 12 {
            return Err(SecretsError::Corrupt(c.name.clone()));
        }
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&c.nonce),
                Payload {
                    msg: &c.ciphertext,
                    aad: c.name.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Corrupt(c.name.clone()))?;
        String::from_utf8(plain).map_err(|_| SecretsError::Corrupt(c.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_binds_the_name() {
        let k = MasterKey::parse(&MasterKey::generate_encoded(), "K").unwrap();
        let c = k.encrypt("openai-prod", "openai", "sk-live-abc").unwrap();
        assert!(!c.ciphertext.windows(6).any(|w| w == b"sk-liv"));
        assert_eq!(k.decrypt(&c).unwrap(), "sk-live-abc");
        let moved = StoredCredential {
            name: "other".into(),
            ..c.clone()
        };
        assert_eq!(
            k.decrypt(&moved),
            Err(SecretsError::Corrupt("other".into()))
        );
        let other = MasterKey::parse(&MasterKey::generate_encoded(), "K").unwrap();
        assert_eq!(
            other.decrypt(&c),
            Err(SecretsError::WrongKey("openai-prod".into()))
        );
    }

    #[test]
    fn wrong_lengths_and_encodings_are_refused() {
        assert_eq!(
            MasterKey::parse("c2hvcnQ=", "TOLLGATE_MASTER_KEY").unwrap_err(),
            SecretsError::BadLength {
                var: "TOLLGATE_MASTER_KEY".into(),
                got: 5
            }
        );
        assert!(matches!(
            MasterKey::parse("not base64 !!", "K"),
            Err(SecretsError::BadEncoding { .. })
        ));
        assert!(MasterKey::parse(&"ab".repeat(32), "K").is_ok());
    }
}
