//! The fleet bundle format and its cryptography (pure: no I/O).
//!
//! A bundle is a signed [`Manifest`] plus the component. The manifest names
//! the plugin, its monotonic version, the world it targets, the component's
//! size and SHA-256, how it is cut into chunks and each chunk's SHA-256, and
//! the ed25519 public key that signed it. The signature covers a canonical
//! text of every other field ([`Manifest::signed_text`]), so a device can
//! check each chunk on its own as it arrives and the whole component once
//! assembled, and nothing in the manifest can change without breaking it.
//!
//! On the wire (see [`super::topics`]) the manifest is published retained as
//! JSON and the component as self-describing [`Chunk`]s, each well under the
//! 128 KiB payload limit of the strictest brokers (AWS IoT Core).
//!
//! Keys and their files are [`crate::signing`]'s.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::plugin::World;
use crate::signing::{self, encode_public, key_id};

/// The manifest format this agent reads and writes.
pub const FORMAT: u32 = 1;

/// The first line of a bundle file.
pub const BUNDLE_MAGIC: &[u8] = b"ferry-bundle/1\n";

/// Default chunk size: with its header a chunk stays far below 128 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// Largest chunk size accepted (header room under a 128 KiB broker limit).
pub const MAX_CHUNK_SIZE: u32 = 120 * 1024;

/// Largest component accepted.
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// Why a manifest, a chunk, a bundle or a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not valid JSON or missing fields.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Manifest, chunk, bundle or key.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// A field breaks the format's rules.
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// Signed by a key the device does not trust.
    #[error("signed by key {key_id}, which is not in [fleet] trusted_keys")]
    UntrustedKey {
        /// The signer's key id.
        key_id: String,
    },
    /// The signature does not verify against the manifest.
    #[error("the signature does not verify (key {key_id}): the manifest was altered or signed with another key")]
    BadSignature {
        /// The claimed signer's key id.
        key_id: String,
    },
    /// A chunk is shorter or longer than the manifest says.
    #[error("chunk {index} of {name} v{version} is truncated or padded: {got} bytes, expected {expected}")]
    ChunkSize {
        /// Plugin name.
        name: String,
        /// Version.
        version: u64,
        /// Chunk index.
        index: u32,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A chunk's bytes do not hash to what its header or the manifest says.
    #[error("chunk {index} of {name} v{version} is corrupt: {reason}")]
    ChunkCorrupt {
        /// Plugin name.
        name: String,
        /// Version.
        version: u64,
        /// Chunk index.
        index: u32,
        /// Which hash disagreed.
        reason: String,
    },
    /// The assembled component does not match the manifest.
    #[error("the assembled component does not match the manifest: {0}")]
    Mismatch(String),
}

impl From<signing::KeyError> for BundleError {
    fn from(e: signing::KeyError) -> Self {
        BundleError::Malformed { what: e.what, reason: e.reason }
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `name` is a valid plugin name (the rules of `[[plugin]] name`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}

/// Whether `pattern` is a valid device pattern: one MQTT topic level of
/// device-id characters, `*` (any run) and `?` (any one character).
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 128
        && !pattern.chars().any(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_control() || c.is_whitespace())
}

/// Whether `device` matches the glob `pattern` (`*` any run, `?` one char).
pub fn pattern_matches(pattern: &str, device: &str) -> bool {
    let (p, d): (Vec<char>, Vec<char>) = (pattern.chars().collect(), device.chars().collect());
    // Classic greedy glob with one backtrack point: linear in practice.
    let (mut pi, mut di, mut star, mut mark) = (0, 0, None, 0);
    while di < d.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == d[di]) {
            pi += 1;
            di += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = di;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            di = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The signed description of one plugin version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// The plugin it updates (a `[[plugin]] name` on the device).
    pub name: String,
    /// Monotonic version: a device never installs one at or below what it runs.
    pub version: u64,
    /// The world the component targets.
    pub world: String,
    /// Component size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the component.
    pub sha256: String,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
    /// Hex SHA-256 of each chunk, in order.
    pub chunks: Vec<String>,
    /// The signer's public key (base64).
    pub key: String,
    /// Base64 ed25519 signature over [`Manifest::signed_text`].
    pub signature: String,
}

impl Manifest {
    /// A manifest for `component`, signed with `key`.
    pub fn sign(
        name: &str,
        version: u64,
        world: World,
        component: &[u8],
        chunk_size: u32,
        key: &SigningKey,
    ) -> Result<Self, BundleError> {
        let mut m = Manifest {
            format: FORMAT,
            name: name.to_owned(),
            version,
            world: world.as_str().to_owned(),
            size: component.len() as u64,
            sha256: sha256_hex(component),
            chunk_size,
            chunks: component.chunks(chunk_size.max(1) as usize).map(sha256_hex).collect(),
            key: encode_public(&key.verifying_key()),
            signature: String::new(),
        };
        m.validate()?;
        m.resign(key);
        Ok(m)
    }

    /// Signs the manifest as it stands (tools and tests that alter fields).
    pub fn resign(&mut self, key: &SigningKey) {
        self.key = encode_public(&key.verifying_key());
        self.signature = B64.encode(key.sign(self.signed_text().as_bytes()).to_bytes());
    }

    /// The canonical text the signature covers: every field but the
    /// signature, one per line, in a fixed order.
    pub fn signed_text(&self) -> String {
        format!(
            "ferry-fleet-manifest/{}\nname={}\nversion={}\nworld={}\nsize={}\nsha256={}\nchunk_size={}\nchunks={}\nkey={}\n",
            self.format,
            self.name,
            self.version,
            self.world,
            self.size,
            self.sha256,
            self.chunk_size,
            self.chunks.join(","),
            self.key
        )
    }

    /// The world, parsed.
    pub fn world(&self) -> Option<World> {
        World::parse(&self.world)
    }

    /// Checks the fields' own rules (no keys involved).
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |r: String| Err(BundleError::Invalid(r));
        if self.format != FORMAT {
            return bad(format!("format {} is not supported (this agent reads format {FORMAT})", self.format));
        }
        if !valid_name(&self.name) {
            return bad(format!("name `{}` must be 1 to 64 letters, digits, `-` or `_`", self.name));
        }
        if self.version == 0 {
            return bad("version must be at least 1 (0 is the configured component)".into());
        }
        if self.world().is_none() {
            return bad(format!("world `{}` is not one of \"filter\", \"merge\"", self.world));
        }
        if self.size == 0 || self.size > MAX_COMPONENT_BYTES {
            return bad(format!("size {} must be between 1 byte and {MAX_COMPONENT_BYTES}", self.size));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return bad(format!("chunk_size {} must be between 1 and {MAX_CHUNK_SIZE}", self.chunk_size));
        }
        let expected = self.size.div_ceil(u64::from(self.chunk_size));
        if self.chunks.len() as u64 != expected {
            return bad(format!(
                "{} chunk hashes for {} bytes in chunks of {} (expected {expected})",
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        let is_hash = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !is_hash(&self.sha256) || !self.chunks.iter().all(|h| is_hash(h)) {
            return bad("hashes must be 64 lowercase hex digits".into());
        }
        Ok(())
    }

    /// Checks the fields, that the signer is trusted and that the signature
    /// verifies. Returns the signer's key id.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<String, BundleError> {
        self.validate()?;
        let key = signing::decode_public(&self.key)?;
        let key_id = key_id(&key);
        if !trusted.iter().any(|t| t.as_bytes() == key.as_bytes()) {
            return Err(BundleError::UntrustedKey { key_id });
        }
        let signature = B64
            .decode(self.signature.trim())
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| BundleError::BadSignature { key_id: key_id.clone() })?;
        key.verify_strict(self.signed_text().as_bytes(), &signature)
            .map_err(|_| BundleError::BadSignature { key_id: key_id.clone() })?;
        Ok(key_id)
    }

    /// Parses a manifest message.
    pub fn from_json(bytes: &[u8]) -> Result<Self, BundleError> {
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed { what: "manifest", reason: e.to_string() })
    }

    /// Bytes chunk `index` must have.
    pub fn chunk_len(&self, index: u32) -> usize {
        let start = u64::from(index) * u64::from(self.chunk_size);
        (self.size.saturating_sub(start)).min(u64::from(self.chunk_size)) as usize
    }

    /// Number of chunks.
    pub fn total(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Checks that the assembled component is what the manifest describes.
    pub fn check_component(&self, component: &[u8]) -> Result<(), BundleError> {
        if component.len() as u64 != self.size {
            return Err(BundleError::Mismatch(format!("{} bytes, the manifest says {}", component.len(), self.size)));
        }
        let digest = sha256_hex(component);
        if digest != self.sha256 {
            return Err(BundleError::Mismatch(format!("sha256 {digest}, the manifest says {}", self.sha256)));
        }
        Ok(())
    }
}

/// The header of one chunk message, before its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkHeader {
    /// Plugin name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Position, from 0.
    pub index: u32,
    /// Number of chunks of this version.
    pub total: u32,
    /// Bytes of data that follow.
    pub size: u32,
    /// Hex SHA-256 of the data.
    pub sha256: String,
}

/// One chunk: header and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its header.
    pub header: ChunkHeader,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Chunk {
    /// Every chunk of `component` as `manifest` cuts it.
    pub fn split(manifest: &Manifest, component: &[u8]) -> Vec<Chunk> {
        component
            .chunks(manifest.chunk_size.max(1) as usize)
            .enumerate()
            .map(|(i, data)| Chunk {
                header: ChunkHeader {
                    name: manifest.name.clone(),
                    version: manifest.version,
                    index: i as u32,
                    total: manifest.total(),
                    size: data.len() as u32,
                    sha256: sha256_hex(data),
                },
                data: data.to_vec(),
            })
            .collect()
    }

    /// The message payload: the header as one JSON line, then the bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&self.header).expect("a header serialises");
        out.push(b'\n');
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses a chunk message (the header only; see [`Chunk::check`]).
    pub fn decode(payload: &[u8]) -> Result<Self, BundleError> {
        let malformed = |reason: String| BundleError::Malformed { what: "chunk", reason };
        let nl = payload.iter().position(|&b| b == b'\n').ok_or_else(|| malformed("no header line".into()))?;
        let header: ChunkHeader = serde_json::from_slice(&payload[..nl]).map_err(|e| malformed(e.to_string()))?;
        Ok(Chunk { header, data: payload[nl + 1..].to_vec() })
    }

    /// Checks the chunk on its own and against `manifest`: same plugin and
    /// version, its position, its length, its own hash, and the signed hash
    /// the manifest lists for its position.
    pub fn check(&self, manifest: &Manifest) -> Result<(), BundleError> {
        let h = &self.header;
        if h.name != manifest.name || h.version != manifest.version || h.total != manifest.total() {
            return Err(BundleError::Invalid(format!(
                "chunk header says {} v{} of {} chunks, the manifest {} v{} of {}",
                h.name,
                h.version,
                h.total,
                manifest.name,
                manifest.version,
                manifest.total()
            )));
        }
        if h.index >= manifest.total() {
            return Err(BundleError::Invalid(format!("chunk index {} of {} chunks", h.index, manifest.total())));
        }
        let corrupt = |reason: String| BundleError::ChunkCorrupt {
            name: h.name.clone(),
            version: h.version,
            index: h.index,
            reason,
        };
        let expected = manifest.chunk_len(h.index);
        if self.data.len() != expected || h.size as usize != expected {
            return Err(BundleError::ChunkSize {
                name: h.name.clone(),
                version: h.version,
                index: h.index,
                got: self.data.len(),
                expected,
            });
        }
        let digest = sha256_hex(&self.data);
        if digest != h.sha256 {
            return Err(corrupt(format!("its bytes hash to {digest}, its header says {}", h.sha256)));
        }
        if digest != manifest.chunks[h.index as usize] {
            return Err(corrupt(format!(
                "its bytes hash to {digest}, the signed manifest says {}",
                manifest.chunks[h.index as usize]
            )));
        }
        Ok(())
    }
}

/// A bundle file: the manifest and the component.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The signed manifest.
    pub manifest: Manifest,
    /// The component's bytes.
    pub component: Vec<u8>,
}

impl Bundle {
    /// The file's bytes: magic line, manifest JSON line, component.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BUNDLE_MAGIC.to_vec();
        out.extend(serde_json::to_vec(&self.manifest).expect("a manifest serialises"));
        out.push(b'\n');
        out.extend_from_slice(&self.component);
        out
    }

    /// Parses a bundle file (not verified; see [`Manifest::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        let malformed = |reason: &str| BundleError::Malformed { what: "bundle", reason: reason.into() };
        let rest = bytes.strip_prefix(BUNDLE_MAGIC).ok_or_else(|| malformed("not a ferry bundle (bad first line)"))?;
        let nl = rest.iter().position(|&b| b == b'\n').ok_or_else(|| malformed("no manifest line"))?;
        let manifest = Manifest::from_json(&rest[..nl])?;
        Ok(Bundle { manifest, component: rest[nl + 1..].to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn manifest(component: &[u8]) -> Manifest {
        Manifest::sign("threshold", 3, World::Filter, component, 4, &key(1)).unwrap()
    }

    #[test]
    fn a_signed_manifest_verifies_against_its_trusted_key_only() {
        let m = manifest(b"0123456789");
        assert_eq!(m.chunks.len(), 3);
        assert!(m.verify(&[key(1).verifying_key()]).is_ok());
        assert!(matches!(m.verify(&[key(2).verifying_key()]), Err(BundleError::UntrustedKey { .. })));
    }

    #[test]
    fn any_altered_field_breaks_the_signature() {
        let trusted = [key(1).verifying_key()];
        let alter: [fn(&mut Manifest); 4] = [
            |m| m.version += 1,
            |m| m.sha256 = "0".repeat(64),
            |m| m.chunks[0] = "1".repeat(64),
            |m| m.world = "merge".into(),
        ];
        for f in alter {
            let mut m = manifest(b"0123456789");
            f(&mut m);
            assert!(matches!(m.verify(&trusted), Err(BundleError::BadSignature { .. })), "{m:?}");
        }
    }

    #[test]
    fn chunks_round_trip_and_each_bad_one_is_named() {
        let component = b"0123456789";
        let m = manifest(component);
        let chunks = Chunk::split(&m, component);
        assert_eq!(chunks.iter().map(|c| c.data.len()).collect::<Vec<_>>(), [4, 4, 2]);
        for c in &chunks {
            let back = Chunk::decode(&c.encode()).unwrap();
            assert_eq!(&back, c);
            back.check(&m).unwrap();
        }
        let mut truncated = chunks[1].clone();
        truncated.data.pop();
        assert!(matches!(truncated.check(&m), Err(BundleError::ChunkSize { index: 1, got: 3, expected: 4, .. })));
        let mut corrupt = chunks[2].clone();
        corrupt.data[0] ^= 1;
        assert!(matches!(corrupt.check(&m), Err(BundleError::ChunkCorrupt { index: 2, .. })));
        // Consistent with its own header, but not what was signed.
        let mut forged = chunks[0].clone();
        forged.data = b"abcd".to_vec();
        forged.header.sha256 = sha256_hex(&forged.data);
        let e = forged.check(&m).unwrap_err().to_string();
        assert!(e.contains("signed manifest"), "{e}");
    }

    #[test]
    fn the_assembled_component_must_match_size_and_hash() {
        let m = manifest(b"0123456789");
        m.check_component(b"0123456789").unwrap();
        assert!(m.check_component(b"0123456780").is_err());
        assert!(m.check_component(b"012345678").is_err());
    }

    #[test]
    fn bundles_round_trip() {
        let b = Bundle { manifest: manifest(b"0123456789"), component: b"0123456789".to_vec() };
        let back = Bundle::decode(&b.encode()).unwrap();
        assert_eq!(back.manifest, b.manifest);
        assert_eq!(back.component, b.component);
        assert!(Bundle::decode(b"not a bundle").is_err());
    }

    #[test]
    fn device_patterns_are_globs_over_one_topic_level() {
        assert!(pattern_matches("*", "gw-1"));
        assert!(pattern_matches("gw-*", "gw-17"));
        assert!(pattern_matches("gw-?", "gw-1"));
        assert!(!pattern_matches("gw-?", "gw-17"));
        assert!(pattern_matches("*-east-*", "gw-east-3"));
        assert!(!pattern_matches("gw-1", "gw-10"));
        assert!(!valid_pattern("a/b") && !valid_pattern("+") && !valid_pattern(""));
        assert!(valid_pattern("gw-*"));
    }

    #[test]
    fn manifests_with_inconsistent_fields_are_invalid() {
        let mut m = manifest(b"0123456789");
        m.chunks.pop();
        assert!(matches!(m.validate(), Err(BundleError::Invalid(_))));
        let mut m = manifest(b"0123456789");
        m.version = 0;
        assert!(m.validate().is_err());
    }
}
