//! The remote manifest: what a snapshot holds and which chunks make up each file.
//!
//! Stored as an envelope `{"sha256": "<hex>", "manifest": {...}}` whose hash covers the exact
//! bytes of `manifest`, so a corrupt manifest is caught before any of it is trusted.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use taidon_core::StateId;
use taidon_store::Manifest;

use crate::RemoteError;

/// The manifest format this crate writes and reads.
pub const FORMAT: u32 = 1;

/// A snapshot in object storage: the local manifest's fields and the data directory's tree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RemoteManifest {
    pub format: u32,
    /// The local manifest (state id, parent, engine, size, tree checksum, times).
    pub snapshot: Manifest,
    /// Bytes of uncompressed data per chunk (the last chunk of a file may be shorter).
    pub chunk_size: u64,
    /// The data directory's own mode.
    pub root_mode: u32,
    /// The data directory's entries, in byte order of their paths.
    pub entries: Vec<Entry>,
}

/// One entry of the data directory; paths are relative and `/`-separated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
        /// Lowercase hex SHA-256 of each uncompressed chunk, in order.
        chunks: Vec<String>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => {
                path
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    sha256: String,
    #[serde(borrow)]
    manifest: &'a RawValue,
}

impl RemoteManifest {
    /// The envelope's bytes.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let body = serde_json::to_string(self)?;
        let raw = RawValue::from_string(body)?;
        let envelope = Envelope {
            sha256: hex::encode(Sha256::digest(raw.get().as_bytes())),
            manifest: &raw,
        };
        serde_json::to_vec_pretty(&envelope)
    }

    /// Reads an envelope stored under `id`'s key, checking its hash, the state id and the
    /// entry paths.
    pub(crate) fn decode(id: &StateId, bytes: &[u8]) -> Result<Self, RemoteError> {
        let mismatch = |what: String| RemoteError::ChecksumMismatch { state: *id, what };
        let envelope: Envelope<'_> = serde_json::from_slice(bytes)
            .map_err(|e| mismatch(format!("manifest is not readable ({e})")))?;
        let actual = hex::encode(Sha256::digest(envelope.manifest.get().as_bytes()));
        if actual != envelope.sha256 {
            return Err(mismatch(format!(
                "manifest hashes to {actual}, recorded {}",
                envelope.sha256
            )));
        }
        let manifest: RemoteManifest = serde_json::from_str(envelope.manifest.get())
            .map_err(|e| mismatch(format!("manifest is not readable ({e})")))?;
        if manifest.format != FORMAT {
            return Err(mismatch(format!(
                "unknown manifest format {}",
                manifest.format
            )));
        }
        if manifest.snapshot.state_id != *id {
            return Err(mismatch(format!(
                "manifest is of state {}",
                manifest.snapshot.state_id
            )));
        }
        if let Some(bad) = manifest
            .entries
            .iter()
            .find(|e| !is_plain_relative(e.path()))
        {
            return Err(mismatch(format!(
                "manifest has a bad path {:?}",
                bad.path()
            )));
        }
        Ok(manifest)
    }
}

/// True for a non-empty relative path of ordinary names (no `..`, `.`, root or empty parts).
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use taidon_core::{EngineFingerprint, InitdbOptions};

    fn sample() -> RemoteManifest {
        RemoteManifest {
            format: FORMAT,
            snapshot: Manifest {
                state_id: StateId::from_bytes([7; 32]),
                parent: None,
                engine: EngineFingerprint {
                    major: 16,
                    minor: 4,
                    initdb: InitdbOptions::default(),
                    settings: Default::default(),
                },
                size_bytes: 3,
                checksum: "sha256:00".to_owned(),
                created_ms: 1,
                build_cost_ms: 2,
            },
            chunk_size: 4,
            root_mode: 0o700,
            entries: vec![
                Entry::Dir {
                    path: "base".to_owned(),
                    mode: 0o700,
                },
                Entry::File {
                    path: "base/x".to_owned(),
                    mode: 0o600,
                    size: 3,
                    chunks: vec!["ab".repeat(32)],
                },
            ],
        }
    }

    #[test]
    fn manifest_round_trips_and_catches_edits() {
        let m = sample();
        let id = m.snapshot.state_id;
        let bytes = m.encode().unwrap();
        assert_eq!(RemoteManifest::decode(&id, &bytes).unwrap(), m);

        let edited = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("\"mode\":384", "\"mode\":420");
        assert_ne!(edited.as_bytes(), &bytes[..]);
        let err = RemoteManifest::decode(&id, edited.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        let other = StateId::from_bytes([8; 32]);
        assert!(RemoteManifest::decode(&other, &bytes).is_err());
        assert!(RemoteManifest::decode(&id, b"not json").is_err());
    }

    #[test]
    fn bad_paths_are_rejected() {
        for bad in ["", "/etc", "../x", "a/../b", "a//b", "./a"] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
        assert!(is_plain_relative("base/1/PG_VERSION"));
    }
}
