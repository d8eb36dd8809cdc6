//! Trust in records: a pushed record travels in an envelope that may carry
//! an ed25519 signature over its canonical JSON; with `trusted_keys`
//! configured, a record without a valid signature by one of them is a miss
//! (Nix's `trusted-public-keys`). Keys are `NAME:BASE64`, as Nix writes them.
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::cache::StageRecord;

use super::error::RemoteError;

/// What `records/ab/<fingerprint>.json` holds on a remote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub record: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<RecordSignature>,
}

/// An ed25519 signature of the record's canonical JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordSignature {
    /// The signing key's name.
    pub key: String,
    /// Base64 of the 64-byte signature.
    pub ed25519: String,
}

/// A named signing key (`NAME:BASE64` of the 32-byte secret).
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

/// A named public key (`NAME:BASE64` of the 32-byte key).
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

/// Whether a record may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// No keys are configured: every intact record is used.
    Unchecked,
    /// Signed by this trusted key.
    SignedBy(String),
    /// Keys are configured and none signed it: a miss.
    Untrusted(String),
}

/// The bytes a signature covers: the record as compact JSON (through
/// `serde_json::Value`, so that signer and verifier serialise alike).
fn canonical(record: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(record).expect("JSON values serialise")
}

fn split_named(text: &str) -> Option<(&str, Vec<u8>)> {
    let (name, b64) = text.trim().split_once(':')?;
    let bytes = BASE64.decode(b64.trim()).ok()?;
    (!name.is_empty()).then_some((name, bytes))
}

impl SecretKey {
    /// A fresh key named `name`.
    pub fn generate(name: &str) -> SecretKey {
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn read(path: &Path) -> Result<SecretKey, RemoteError> {
        let bad = |message: &str| RemoteError::Key {
            path: path.to_path_buf(),
            message: message.to_string(),
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(&e.to_string()))?;
        let (name, bytes) = split_named(&text).ok_or_else(|| bad("expected NAME:BASE64"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("an ed25519 secret key is 32 bytes"))?;
        Ok(SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// `NAME:BASE64` of the secret (what the key file holds).
    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.to_bytes()))
    }

    /// `NAME:BASE64` of the public key (what `trusted_keys` lists).
    pub fn public_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().to_bytes())
        )
    }

    /// Whether `envelope` carries a valid signature by this key.
    pub fn signed(&self, envelope: &Envelope) -> bool {
        let public = PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        };
        matches!(trust(envelope, &[public]), Trust::SignedBy(_))
    }

    /// The envelope of `record`, signed.
    pub fn seal(&self, record: &StageRecord) -> Envelope {
        let value = serde_json::to_value(record).expect("records serialise");
        let sig = self.key.sign(&canonical(&value));
        Envelope {
            record: value,
            signature: Some(RecordSignature {
                key: self.name.clone(),
                ed25519: BASE64.encode(sig.to_bytes()),
            }),
        }
    }
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let (name, bytes) =
            split_named(text).ok_or_else(|| format!("`{text}`: expected NAME:BASE64"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("`{text}`: an ed25519 public key is 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("`{text}`: {e}"))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }
}

/// An unsigned envelope.
pub fn unsigned(record: &StageRecord) -> Envelope {
    Envelope {
        record: serde_json::to_value(record).expect("records serialise"),
        signature: None,
    }
}

/// Whether `envelope` is trusted under `keys` (none: everything is).
pub fn trust(envelope: &Envelope, keys: &[PublicKey]) -> Trust {
    if keys.is_empty() {
        return Trust::Unchecked;
    }
    let Some(sig) = &envelope.signature else {
        return Trust::Untrusted("the record is not signed".into());
    };
    let Some(key) = keys.iter().find(|k| k.name == sig.key) else {
        return Trust::Untrusted(format!(
            "signed by `{}`, which is not a trusted key",
            sig.key
        ));
    };
    let valid = BASE64
        .decode(&sig.ed25519)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .is_some_and(|s| key.key.verify(&canonical(&envelope.record), &s).is_ok());
    if valid {
        Trust::SignedBy(key.name.clone())
    } else {
        Trust::Untrusted(format!(
            "the signature by `{}` does not match the record",
            sig.key
        ))
    }
}

/// Writes a new key pair: the secret to `path` (mode 0600), returning it.
pub fn keygen(name: &str, path: &PathBuf) -> Result<SecretKey, RemoteError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = SecretKey::generate(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| RemoteError::Io {
            path: path.clone(),
            source,
        })?;
    writeln!(file, "{}", key.to_text()).map_err(|source| RemoteError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> StageRecord {
        serde_json::from_value(serde_json::json!({
            "fingerprint": "ab".repeat(32),
            "key": {"schema_version": 1, "op": "exec", "op_version": 1, "params": {"z": 1, "a": 2}, "inputs": {}, "seed": 3},
            "pipeline": "p", "stage": "s", "outputs": {}, "metrics": {"m": 1.5},
            "duration_s": 1.0, "engine_version": "0", "started_at": "t", "finished_at": "t"
        }))
        .unwrap()
    }

    #[test]
    fn a_signature_survives_the_round_trip_and_binds_the_record() {
        let key = SecretKey::generate("ci");
        let public = PublicKey::parse(&key.public_text()).unwrap();
        let text = serde_json::to_string_pretty(&key.seal(&record())).unwrap();
        let envelope: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(
            trust(&envelope, &[public.clone()]),
            Trust::SignedBy("ci".into())
        );
        let mut forged = envelope.clone();
        forged.record["stage"] = "other".into();
        assert!(matches!(
            trust(&forged, &[public.clone()]),
            Trust::Untrusted(_)
        ));
        let other = PublicKey::parse(&SecretKey::generate("ci").public_text()).unwrap();
        assert!(matches!(trust(&envelope, &[other]), Trust::Untrusted(_)));
        assert!(matches!(
            trust(&unsigned(&record()), &[public]),
            Trust::Untrusted(_)
        ));
        assert_eq!(trust(&unsigned(&record()), &[]), Trust::Unchecked);
    }

    #[test]
    fn key_texts_parse_back() {
        let key = SecretKey::generate("team");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, key.to_text()).unwrap();
        assert_eq!(
            SecretKey::read(&path).unwrap().public_text(),
            key.public_text()
        );
        assert!(PublicKey::parse("nocolon").is_err());
    }
}
