//! Gateway tokens: signed JWT claims that say which state and instance a connection may reach.

use serde::{Deserialize, Serialize};

use crate::id::{InstanceId, StateId};

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Ro,
    Rw,
}

/// The claims of a gateway token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The state the instance was made from.
    pub sid: StateId,
    /// The instance this token reaches.
    pub iid: InstanceId,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// The installation id: a token minted by another installation is refused.
    pub aud: String,
    pub scope: Scope,
}

/// Why a token was refused. The gateway tells the client only that authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed(#[source] jsonwebtoken::errors::Error),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is for another installation")]
    WrongAudience,
    #[error("token is invalid")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("cannot sign token")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// Signs and checks tokens with one HS256 key for one installation.
#[derive(Clone)]
pub struct TokenKey {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    audience: String,
    leeway_s: u64,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// A key from the shared secret and the installation id tokens must name as `aud`.
    pub fn hs256(secret: &[u8], audience: impl Into<String>) -> Self {
        Self {
            encoding: jsonwebtoken::EncodingKey::from_secret(secret),
            decoding: jsonwebtoken::DecodingKey::from_secret(secret),
            audience: audience.into(),
            leeway_s: 30,
        }
    }

    /// The installation id this key signs for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Claims for `iid` of `sid`, valid from `now_s` for `ttl_s` seconds.
    pub fn claims(
        &self,
        sid: StateId,
        iid: InstanceId,
        scope: Scope,
        now_s: u64,
        ttl_s: u64,
    ) -> Claims {
        Claims {
            sid,
            iid,
            exp: now_s.saturating_add(ttl_s),
            iat: now_s,
            aud: self.audience.clone(),
            scope,
        }
    }

    /// The compact JWT for `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &self.encoding,
        )
        .map_err(TokenError::Sign)
    }

    /// The claims of `token` if its signature, audience and expiry hold at `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_audience(&[&self.audience]);
        // Expiry is checked below against the injected clock, not the system's.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => TokenError::Malformed(e),
                _ => TokenError::Invalid(e),
            },
        )?;
        if data.claims.exp.saturating_add(self.leeway_s) < now_s {
            return Err(TokenError::Expired);
        }
        Ok(data.claims)
    }
}

/// A short, non-reversible fingerprint of a token for logs: never log the token itself.
pub fn fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(token.as_bytes())[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> TokenKey {
        TokenKey::hs256(b"0123456789abcdef0123456789abcdef", "install-1")
    }

    fn claims(k: &TokenKey) -> Claims {
        k.claims(
            StateId::from_bytes([1; 32]),
            InstanceId::from_bytes([2; 8]),
            Scope::Rw,
            NOW,
            600,
        )
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let k = key();
        let c = claims(&k);
        let t = k.sign(&c).unwrap();
        assert_eq!(k.verify(&t, NOW + 10).unwrap(), c);
        assert_eq!(fingerprint(&t).len(), 12);
    }

    #[test]
    fn expired_wrong_audience_bad_signature_and_garbage_are_refused() {
        let k = key();
        let t = k.sign(&claims(&k)).unwrap();
        assert!(matches!(
            k.verify(&t, NOW + 600 + 31),
            Err(TokenError::Expired)
        ));
        // Within the leeway it still holds.
        assert!(k.verify(&t, NOW + 600 + 29).is_ok());

        let other_aud = TokenKey::hs256(b"0123456789abcdef0123456789abcdef", "install-2");
        assert!(matches!(
            other_aud.verify(&t, NOW),
            Err(TokenError::WrongAudience)
        ));

        let other_key = TokenKey::hs256(b"another secret of enough length!", "install-1");
        assert!(matches!(
            other_key.verify(&t, NOW),
            Err(TokenError::BadSignature)
        ));

        assert!(matches!(
            k.verify("not.a.jwt", NOW),
            Err(TokenError::Malformed(_))
        ));
        assert!(k.verify("", NOW).is_err());
    }
}
