//! Gateway tokens: signed JWT claims that say which state (and, for `rw`, which instance) a
//! connection may reach, and the keyset they are signed and checked with.
//!
//! A keyset holds every key the gateway accepts (the current one and the previous ones), each
//! named by a `kid` that tokens carry in their header, so keys rotate without refusing a token
//! signed a moment before. HS256 (a shared secret) and EdDSA (Ed25519) are supported.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::id::{InstanceId, StateId};

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read only: a session that cannot write, on an instance shared by the state's readers.
    Ro,
    /// Read and write, on the token's own instance.
    Rw,
}

impl Scope {
    /// `ro` or `rw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ro => "ro",
            Scope::Rw => "rw",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ro" => Ok(Scope::Ro),
            "rw" => Ok(Scope::Rw),
            other => Err(format!("unknown scope {other:?}: expected ro or rw")),
        }
    }
}

/// Limits a token puts on the sessions it opens; each is a ceiling on the controller's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// At most this many sessions at once on the token's state (ro) or instance (rw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conn: Option<u32>,
    /// A session idle (no query running, nothing sent) this long is ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_s: Option<u64>,
    /// A session is ended this long after it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u64>,
}

/// The claims of a gateway token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The state the token reaches.
    pub sid: StateId,
    /// The instance an `rw` token reaches; `ro` tokens name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iid: Option<InstanceId>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The installation id: a token minted by another installation is refused.
    pub aud: String,
    pub scope: Scope,
    /// Who the token was minted for, for logs and per-subject rate limits.
    #[serde(default)]
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// The one database the token reaches (a lease's own): the gateway connects there
    /// whatever database the client names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<String>,
}

/// Why a token was refused. The gateway tells the client only that authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed(#[source] jsonwebtoken::errors::Error),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token names an unknown key {kid:?}")]
    UnknownKey { kid: String },
    #[error("token algorithm does not match its key")]
    WrongAlgorithm,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is for another installation")]
    WrongAudience,
    #[error("token is invalid")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("cannot sign token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("the keyset has no signing key")]
    NoSigningKey,
}

/// Why a keyset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysetError {
    #[error("keyset is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("key {kid:?}: {what}")]
    BadKey { kid: String, what: String },
    #[error("keyset has no keys")]
    Empty,
    #[error("current key {0:?} is not in the keyset")]
    NoCurrent(String),
    #[error("two keys are named {0:?}")]
    DuplicateKid(String),
    #[error("keyset has an empty audience")]
    NoAudience,
}

/// A signing algorithm of a keyset entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Algorithm {
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl Algorithm {
    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::Hs256 => jsonwebtoken::Algorithm::HS256,
            Algorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

/// One key of a keyset file. Secrets are hex: an HS256 secret, an Ed25519 private key as
/// PKCS#8 DER, an Ed25519 public key as its 32 raw bytes. A key without its private half only
/// verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub kid: String,
    pub alg: Algorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_pkcs8_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_hex: Option<String>,
}

/// The keyset file (`<home>/keyset.json`, mode 0600): the audience, which key signs, and
/// every key accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysetFile {
    /// The installation id tokens must name as `aud`.
    pub audience: String,
    /// The `kid` new tokens are signed with.
    pub current: String,
    pub keys: Vec<KeyEntry>,
}

impl KeysetFile {
    /// The file after a rotation: `new` becomes current, the old current key stays accepted,
    /// and keys older than that are dropped.
    pub fn rotated(&self, new: KeyEntry) -> KeysetFile {
        let previous = self.keys.iter().find(|k| k.kid == self.current).cloned();
        KeysetFile {
            audience: self.audience.clone(),
            current: new.kid.clone(),
            keys: std::iter::once(new).chain(previous).collect(),
        }
    }
}

struct Key {
    kid: String,
    alg: Algorithm,
    encoding: Option<jsonwebtoken::EncodingKey>,
    decoding: jsonwebtoken::DecodingKey,
    /// The Ed25519 public key (hex), what a gateway elsewhere may be given; `None` for HS256.
    public_hex: Option<String>,
}

/// The default clock-skew leeway for `exp` and `nbf`.
pub const DEFAULT_LEEWAY_S: u64 = 30;

/// Signs tokens with its current key and checks them against every key it holds.
#[derive(Clone)]
pub struct Keyset {
    keys: Arc<Vec<Key>>,
    current: Option<usize>,
    audience: String,
    leeway_s: u64,
}

/// The name issue-3 code used for a single-key keyset.
pub type TokenKey = Keyset;

impl std::fmt::Debug for Keyset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyset")
            .field("audience", &self.audience)
            .field("kids", &self.kids())
            .field("leeway_s", &self.leeway_s)
            .finish_non_exhaustive()
    }
}

fn unhex(kid: &str, what: &str, value: Option<&String>) -> Result<Vec<u8>, KeysetError> {
    let bad = |w: String| KeysetError::BadKey {
        kid: kid.to_owned(),
        what: w,
    };
    let v = value.ok_or_else(|| bad(format!("{what} is missing")))?;
    hex::decode(v.trim()).map_err(|_| bad(format!("{what} is not hex")))
}

impl Key {
    fn from_entry(e: &KeyEntry) -> Result<Key, KeysetError> {
        let bad = |w: &str| KeysetError::BadKey {
            kid: e.kid.clone(),
            what: w.to_owned(),
        };
        if e.kid.is_empty() {
            return Err(bad("empty kid"));
        }
        let mut public_hex = None;
        let (encoding, decoding) = match e.alg {
            Algorithm::Hs256 => {
                let secret = unhex(&e.kid, "secret_hex", e.secret_hex.as_ref())?;
                if secret.len() < 16 {
                    return Err(bad("an HS256 secret needs at least 16 bytes"));
                }
                (
                    Some(jsonwebtoken::EncodingKey::from_secret(&secret)),
                    jsonwebtoken::DecodingKey::from_secret(&secret),
                )
            }
            Algorithm::EdDsa => {
                let public = unhex(&e.kid, "public_hex", e.public_hex.as_ref())?;
                if public.len() != 32 {
                    return Err(bad("an Ed25519 public key is 32 bytes"));
                }
                let encoding = match &e.private_pkcs8_hex {
                    Some(_) => Some(jsonwebtoken::EncodingKey::from_ed_der(&unhex(
                        &e.kid,
                        "private_pkcs8_hex",
                        e.private_pkcs8_hex.as_ref(),
                    )?)),
                    None => None,
                };
                public_hex = Some(hex::encode(&public));
                (encoding, jsonwebtoken::DecodingKey::from_ed_der(&public))
            }
        };
        Ok(Key {
            kid: e.kid.clone(),
            alg: e.alg,
            encoding,
            decoding,
            public_hex,
        })
    }
}

impl Keyset {
    /// A keyset of one HS256 key from a shared secret, for the installation `audience`.
    pub fn hs256(secret: &[u8], audience: impl Into<String>) -> Self {
        let kid = format!("hs256-{}", &fingerprint_bytes(secret)[..8]);
        Self {
            keys: Arc::new(vec![Key {
                kid,
                alg: Algorithm::Hs256,
                encoding: Some(jsonwebtoken::EncodingKey::from_secret(secret)),
                decoding: jsonwebtoken::DecodingKey::from_secret(secret),
                public_hex: None,
            }]),
            current: Some(0),
            audience: audience.into(),
            leeway_s: DEFAULT_LEEWAY_S,
        }
    }

    /// A keyset from its file's contents, checked whole: a bad file changes nothing.
    pub fn from_json(text: &str) -> Result<Self, KeysetError> {
        let file: KeysetFile = serde_json::from_str(text).map_err(KeysetError::Json)?;
        Self::from_file(&file)
    }

    /// A keyset from a parsed keyset file.
    pub fn from_file(file: &KeysetFile) -> Result<Self, KeysetError> {
        let keys = Self::keys_of(file)?;
        let current = keys
            .iter()
            .position(|k| k.kid == file.current)
            .ok_or_else(|| KeysetError::NoCurrent(file.current.clone()))?;
        if keys[current].encoding.is_none() {
            return Err(KeysetError::BadKey {
                kid: file.current.clone(),
                what: "the current key has no private half".into(),
            });
        }
        Ok(Self {
            keys: Arc::new(keys),
            current: Some(current),
            audience: file.audience.clone(),
            leeway_s: DEFAULT_LEEWAY_S,
        })
    }

    /// A keyset that only verifies: the public keys a gateway apart from the controller is
    /// given. None of its keys signs; `file.current` need not be among them.
    pub fn verify_only(file: &KeysetFile) -> Result<Self, KeysetError> {
        let keys = Self::keys_of(file)?;
        Ok(Self {
            keys: Arc::new(
                keys.into_iter()
                    .map(|k| Key {
                        encoding: None,
                        ..k
                    })
                    .collect(),
            ),
            current: None,
            audience: file.audience.clone(),
            leeway_s: DEFAULT_LEEWAY_S,
        })
    }

    fn keys_of(file: &KeysetFile) -> Result<Vec<Key>, KeysetError> {
        if file.audience.trim().is_empty() {
            return Err(KeysetError::NoAudience);
        }
        if file.keys.is_empty() {
            return Err(KeysetError::Empty);
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        for e in &file.keys {
            if keys.iter().any(|k: &Key| k.kid == e.kid) {
                return Err(KeysetError::DuplicateKid(e.kid.clone()));
            }
            keys.push(Key::from_entry(e)?);
        }
        Ok(keys)
    }

    /// The `kid` and algorithm of the key new tokens are signed with, if any signs.
    pub fn current(&self) -> Option<(&str, Algorithm)> {
        self.current
            .and_then(|c| self.keys.get(c))
            .map(|k| (k.kid.as_str(), k.alg))
    }

    /// The Ed25519 keys as public entries (no private half), current first; HS256 secrets are
    /// never among them.
    pub fn public_entries(&self) -> Vec<KeyEntry> {
        self.kids()
            .into_iter()
            .filter_map(|kid| self.keys.iter().find(|k| k.kid == kid))
            .filter_map(|k| {
                k.public_hex.as_ref().map(|p| KeyEntry {
                    kid: k.kid.clone(),
                    alg: k.alg,
                    secret_hex: None,
                    private_pkcs8_hex: None,
                    public_hex: Some(p.clone()),
                })
            })
            .collect()
    }

    /// The same keyset with a clock-skew leeway of `leeway_s` for `exp` and `nbf`.
    pub fn with_leeway(mut self, leeway_s: u64) -> Self {
        self.leeway_s = leeway_s;
        self
    }

    /// The installation id this keyset signs for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The `kid` of every key, current first.
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        if let Some(c) = self.current {
            kids.swap(0, c);
        }
        kids
    }

    /// `rw` claims for `iid` of `sid`, valid from `now_s` for `ttl_s` seconds.
    pub fn claims(
        &self,
        sid: StateId,
        iid: InstanceId,
        scope: Scope,
        now_s: u64,
        ttl_s: u64,
    ) -> Claims {
        let mut c = self.claims_for(sid, scope, now_s, ttl_s);
        c.iid = Some(iid);
        c
    }

    /// Claims for the state `sid` without an instance (what an `ro` token carries).
    pub fn claims_for(&self, sid: StateId, scope: Scope, now_s: u64, ttl_s: u64) -> Claims {
        Claims {
            sid,
            iid: None,
            exp: now_s.saturating_add(ttl_s),
            iat: now_s,
            nbf: Some(now_s),
            aud: self.audience.clone(),
            scope,
            sub: "sqlrs".to_owned(),
            nonce: None,
            limits: None,
            db: None,
        }
    }

    /// The compact JWT for `claims`, signed with the current key and naming it as `kid`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let key = self
            .current
            .and_then(|c| self.keys.get(c))
            .ok_or(TokenError::NoSigningKey)?;
        let encoding = key.encoding.as_ref().ok_or(TokenError::NoSigningKey)?;
        let mut header = jsonwebtoken::Header::new(key.alg.jwt());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, encoding).map_err(TokenError::Sign)
    }

    /// The claims of `token` if its key is in the set, its signature and audience hold, and
    /// `now_s` lies between `nbf` and `exp` (each widened by the leeway).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(map_jwt_error)?;
        let claims = match &header.kid {
            Some(kid) => {
                let key = self
                    .keys
                    .iter()
                    .find(|k| &k.kid == kid)
                    .ok_or_else(|| TokenError::UnknownKey { kid: kid.clone() })?;
                if key.alg.jwt() != header.alg {
                    return Err(TokenError::WrongAlgorithm);
                }
                self.decode(token, key)?
            }
            // Tokens minted before keysets carried no kid: try the keys of their algorithm.
            None => {
                let mut last = TokenError::UnknownKey { kid: String::new() };
                let mut found = None;
                for key in self.keys.iter().filter(|k| k.alg.jwt() == header.alg) {
                    match self.decode(token, key) {
                        Ok(c) => {
                            found = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                found.ok_or(last)?
            }
        };
        if claims.aud != self.audience {
            return Err(TokenError::WrongAudience);
        }
        if claims.exp.saturating_add(self.leeway_s) < now_s {
            return Err(TokenError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now_s.saturating_add(self.leeway_s))
        {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }

    fn decode(&self, token: &str, key: &Key) -> Result<Claims, TokenError> {
        let mut validation = jsonwebtoken::Validation::new(key.alg.jwt());
        validation.set_audience(&[&self.audience]);
        // Time claims are checked by `verify` against the injected clock, not the system's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map(|d| d.claims)
            .map_err(map_jwt_error)
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => TokenError::Malformed(e),
        _ => TokenError::Invalid(e),
    }
}

/// A keyset that can be swapped whole while readers hold the previous one (hot reload).
#[derive(Debug)]
pub struct SharedKeyset(RwLock<Arc<Keyset>>);

impl SharedKeyset {
    pub fn new(keyset: Keyset) -> Self {
        Self(RwLock::new(Arc::new(keyset)))
    }

    /// The keyset in force.
    pub fn get(&self) -> Arc<Keyset> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `keyset` in force for every later `get`.
    pub fn replace(&self, keyset: Keyset) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keyset);
    }
}

/// Whether `s` has the shape of a compact JWT (three base64url parts), to tell a token in the
/// user name from an ordinary user name.
pub fn looks_like_jwt(s: &str) -> bool {
    let mut parts = 0;
    for part in s.split('.') {
        parts += 1;
        if part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    parts == 3 && s.len() >= 20
}

/// A short, non-reversible fingerprint of a token for logs: never log the token itself.
pub fn fingerprint(token: &str) -> String {
    fingerprint_bytes(token.as_bytes())
}

fn fingerprint_bytes(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(b)[..6])
}

#[cfg(test)]
mod tests;
