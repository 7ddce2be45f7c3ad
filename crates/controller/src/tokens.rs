//! API tokens per user: made with `taidon token create`, kept in the metadata as SHA-256
//! hashes, and looked up on every request, so a revocation holds from the next request on.
//!
//! A token reads `tdn_<id>_<secret>`: the id (16 hex) names it in `taidon token revoke` and in
//! logs; the secret (64 hex) never leaves the token. The home's own `api.token` is the admin
//! token of the embedded default and is not stored here.

use std::collections::HashMap;

use rand::RngCore;
use rusqlite::{params, OptionalExtension};
use taidon_api::{TokenInfo, TokenRole};
use taidon_core::InstanceId;

use crate::meta::{Meta, MetaError};

/// The subject of the home's own `api.token`: the owner of what the local CLI creates.
pub const LOCAL_ADMIN_SUB: &str = "admin";

const TOKEN_PREFIX: &str = "tdn";

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    pub role: TokenRole,
}

impl Principal {
    /// The home's own admin token.
    pub fn local_admin() -> Self {
        Self {
            sub: LOCAL_ADMIN_SUB.to_owned(),
            role: TokenRole::Admin,
        }
    }

    /// Whether this principal may act on something `owner` created: its own, or any as admin.
    /// Nobody but an admin owns what has no owner (standbys, shared ro instances).
    pub fn may_act_for(&self, owner: &str) -> bool {
        self.role == TokenRole::Admin || (!owner.is_empty() && owner == self.sub)
    }
}

/// Why a request's token was refused (HTTP 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API token (Authorization: Bearer <token>)")]
    Missing,
    #[error("unknown API token")]
    Unknown,
    #[error("API token {id} has expired")]
    Expired { id: String },
    #[error("API token {id} was revoked")]
    Revoked { id: String },
    #[error("cannot check the API token")]
    Meta(#[from] MetaError),
}

/// Why a token could not be made or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid subject {0:?}: 1 to 64 characters of letters, digits, '.', '_', '@' or '-'")]
    BadSubject(String),
    #[error("the subject {LOCAL_ADMIN_SUB:?} is the home's own admin token; choose another")]
    ReservedSubject,
    #[error("no token matches {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// A token just made: the only time the token itself is shown.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: String,
    pub info: TokenInfo,
}

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS api_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    sub         TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER,
    revoked_ms  INTEGER
);
CREATE TABLE IF NOT EXISTS instance_owners (
    instance_id TEXT PRIMARY KEY,
    owner       TEXT NOT NULL
);
"#;

fn hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The id part of a token of our shape.
fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

fn valid_subject(sub: &str) -> bool {
    (1..=64).contains(&sub.len())
        && sub
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type TokenRow = (String, String, String, i64, Option<i64>, Option<i64>);

fn info_of(row: TokenRow) -> Result<TokenInfo, MetaError> {
    let (id, sub, role, created, expires, revoked) = row;
    Ok(TokenInfo {
        id,
        sub,
        role: role.parse().map_err(MetaError::Corrupt)?,
        created_ms: created as u64,
        expires_ms: expires.map(|v| v as u64),
        revoked_ms: revoked.map(|v| v as u64),
    })
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

const COLUMNS: &str = "id, sub, role, created_ms, expires_ms, revoked_ms";

impl Meta {
    /// Makes a token for `sub` with `role`, valid for `ttl_ms` (for ever when `None`).
    pub fn create_token(
        &self,
        sub: &str,
        role: TokenRole,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<NewToken, TokenError> {
        if !valid_subject(sub) {
            return Err(TokenError::BadSubject(sub.to_owned()));
        }
        if sub == LOCAL_ADMIN_SUB && role != TokenRole::Admin {
            return Err(TokenError::ReservedSubject);
        }
        let id = random_hex(8);
        let token = format!("{TOKEN_PREFIX}_{id}_{}", random_hex(32));
        let info = TokenInfo {
            id: id.clone(),
            sub: sub.to_owned(),
            role,
            created_ms: now_ms,
            expires_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
            revoked_ms: None,
        };
        self.with(|c| {
            c.execute(
                "INSERT INTO api_tokens (id, hash, sub, role, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    hash(&token),
                    sub,
                    role.as_str(),
                    now_ms as i64,
                    info.expires_ms.map(|v| v as i64)
                ],
            )?;
            Ok(())
        })?;
        Ok(NewToken { token, info })
    }

    /// Revokes the token given whole or by its id; revoking one already revoked is a no-op.
    pub fn revoke_token(&self, token_or_id: &str, now_ms: u64) -> Result<TokenInfo, TokenError> {
        let token_or_id = token_or_id.trim();
        let found = self.with(|c| {
            let by_hash = c
                .query_row(
                    &format!("SELECT {COLUMNS} FROM api_tokens WHERE hash = ?1"),
                    params![hash(token_or_id)],
                    read_row,
                )
                .optional()?;
            let row = match by_hash {
                Some(r) => Some(r),
                None => c
                    .query_row(
                        &format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1"),
                        params![token_or_id],
                        read_row,
                    )
                    .optional()?,
            };
            if let Some(r) = &row {
                c.execute(
                    "UPDATE api_tokens SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE id = ?1",
                    params![r.0, now_ms as i64],
                )?;
            }
            Ok(row)
        })?;
        let Some(row) = found else {
            // Never echo what looks like a token.
            let shown = match token_id(token_or_id) {
                Some(id) => id.to_owned(),
                None if token_or_id.len() <= 16 => token_or_id.to_owned(),
                None => "(the given token)".to_owned(),
            };
            return Err(TokenError::NotFound(shown));
        };
        let mut info = info_of(row)?;
        info.revoked_ms.get_or_insert(now_ms);
        Ok(info)
    }

    /// Every token made here, revoked ones included, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM api_tokens ORDER BY created_ms, id"
            ))?;
            let rows = stmt
                .query_map([], read_row)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(info_of).collect()
        })
    }

    /// Who `token` belongs to, if it is known, unexpired and not revoked at `now_ms`.
    pub fn authenticate_token(&self, token: &str, now_ms: u64) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let row = self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {COLUMNS} FROM api_tokens WHERE hash = ?1"),
                params![hash(token)],
                read_row,
            )
            .optional()?)
        })?;
        let info = info_of(row.ok_or(AuthError::Unknown)?)?;
        if info.revoked_ms.is_some() {
            return Err(AuthError::Revoked { id: info.id });
        }
        if info.expires_ms.is_some_and(|e| e <= now_ms) {
            return Err(AuthError::Expired { id: info.id });
        }
        Ok(Principal {
            sub: info.sub,
            role: info.role,
        })
    }

    /// Records who created an instance.
    pub fn set_instance_owner(&self, iid: &InstanceId, owner: &str) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO instance_owners (instance_id, owner) VALUES (?1, ?2)",
                params![iid.to_string(), owner],
            )?;
            Ok(())
        })
    }

    /// Who created an instance; empty when nobody is recorded.
    pub fn instance_owner(&self, iid: &InstanceId) -> Result<String, MetaError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT owner FROM instance_owners WHERE instance_id = ?1",
                params![iid.to_string()],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .unwrap_or_default())
        })
    }

    /// The owner of every instance that has one.
    pub fn instance_owners(&self) -> Result<HashMap<InstanceId, String>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT instance_id, owner FROM instance_owners")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = HashMap::with_capacity(rows.len());
            for (iid, owner) in rows {
                let iid = iid
                    .parse()
                    .map_err(|_| MetaError::Corrupt(format!("instance id {iid:?}")))?;
                out.insert(iid, owner);
            }
            Ok(out)
        })
    }
}

impl crate::Controller {
    /// Records `principal` as the owner of an instance it just got, in `info` too.
    pub fn assign_owner(
        &self,
        info: &mut taidon_api::InstanceInfo,
        principal: &Principal,
    ) -> Result<(), crate::ControllerError> {
        self.meta
            .set_instance_owner(&info.instance_id, &principal.sub)?;
        info.owner = principal.sub.clone();
        Ok(())
    }

    /// The instance `typed` (an id or prefix) names, if `principal` may act on it.
    pub fn authorize_instance(
        &self,
        principal: &Principal,
        typed: &str,
    ) -> Result<InstanceId, crate::ControllerError> {
        let iid = self.resolve_instance(typed)?.instance_id;
        self.check_owner(principal, &iid)?;
        Ok(iid)
    }

    fn check_owner(
        &self,
        principal: &Principal,
        iid: &InstanceId,
    ) -> Result<(), crate::ControllerError> {
        if principal.may_act_for(&self.meta.instance_owner(iid)?) {
            Ok(())
        } else {
            Err(crate::ControllerError::Forbidden(format!(
                "instance {iid} is not yours"
            )))
        }
    }

    /// A DSN for an instance is for its owner only; states are shared by everyone.
    pub fn authorize_dsn(
        &self,
        principal: &Principal,
        target: &str,
    ) -> Result<(), crate::ControllerError> {
        // The same lookup `mint_dsn` makes: an instance first, then a state.
        let instance = self
            .meta
            .instances()?
            .into_iter()
            .find(|r| target.len() >= 8 && r.instance_id.to_string().starts_with(target));
        match instance {
            Some(row) => self.check_owner(principal, &row.instance_id),
            None => Ok(()),
        }
    }

    /// Removing a state with `force` removes its instances: all must be the principal's.
    pub fn authorize_state_removal(
        &self,
        principal: &Principal,
        typed: &str,
        force: bool,
    ) -> Result<(), crate::ControllerError> {
        if !force || principal.role == TokenRole::Admin {
            return Ok(());
        }
        let sid = self.state_by_prefix(typed)?;
        for row in self.meta.instances()?.iter().filter(|r| r.state_id == sid) {
            self.check_owner(principal, &row.instance_id)?;
        }
        Ok(())
    }

    /// Every instance, as `principal` may see it: the DSNs of other users' are left out.
    pub fn list_instances_for(
        &self,
        principal: &Principal,
    ) -> Result<Vec<taidon_api::InstanceInfo>, crate::ControllerError> {
        let mut list = self.list_instances()?;
        for info in &mut list {
            if !principal.may_act_for(&info.owner) {
                info.dsn.clear();
            }
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("meta.db")).unwrap();
        (dir, meta)
    }

    #[test]
    fn a_token_authenticates_until_it_expires_or_is_revoked() {
        let (_d, meta) = meta();
        let t = meta
            .create_token("alice", TokenRole::User, Some(1_000), 10_000)
            .unwrap();
        assert!(t.token.starts_with(&format!("tdn_{}_", t.info.id)));
        assert_eq!(
            meta.authenticate_token(&t.token, 10_500).unwrap(),
            Principal {
                sub: "alice".into(),
                role: TokenRole::User
            }
        );
        assert!(matches!(
            meta.authenticate_token(&t.token, 11_000),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            meta.authenticate_token("tdn_0_x", 10_500),
            Err(AuthError::Unknown)
        ));
        assert!(matches!(
            meta.authenticate_token("", 10_500),
            Err(AuthError::Missing)
        ));

        let g = meta
            .create_token("gw1", TokenRole::Gateway, None, 10_000)
            .unwrap();
        let revoked = meta.revoke_token(&g.info.id, 20_000).unwrap();
        assert_eq!(revoked.revoked_ms, Some(20_000));
        assert!(matches!(
            meta.authenticate_token(&g.token, 20_001),
            Err(AuthError::Revoked { .. })
        ));
        // By the token itself too, and again without harm.
        assert_eq!(
            meta.revoke_token(&g.token, 30_000).unwrap().revoked_ms,
            Some(20_000)
        );
        assert!(matches!(
            meta.revoke_token("tdn_ffff_0000", 1),
            Err(TokenError::NotFound(id)) if id == "ffff"
        ));
        let listed = meta.tokens().unwrap();
        assert_eq!(listed.len(), 2);
        // Only hashes are stored.
        let stored: Vec<String> = meta
            .with(|c| {
                let mut s = c.prepare("SELECT hash FROM api_tokens").unwrap();
                let rows = s.query_map([], |r| r.get(0)).unwrap();
                Ok(rows.collect::<Result<Vec<String>, _>>().unwrap())
            })
            .unwrap();
        assert!(!stored.iter().any(|h| h == &t.token || h == &g.token));
    }

    #[test]
    fn subjects_are_checked_and_admin_is_reserved() {
        let (_d, meta) = meta();
        assert!(matches!(
            meta.create_token("", TokenRole::User, None, 0),
            Err(TokenError::BadSubject(_))
        ));
        assert!(matches!(
            meta.create_token("a b", TokenRole::User, None, 0),
            Err(TokenError::BadSubject(_))
        ));
        assert!(matches!(
            meta.create_token(LOCAL_ADMIN_SUB, TokenRole::User, None, 0),
            Err(TokenError::ReservedSubject)
        ));
        assert!(meta
            .create_token(LOCAL_ADMIN_SUB, TokenRole::Admin, None, 0)
            .is_ok());
    }

    #[test]
    fn owners_decide_who_may_act() {
        let alice = Principal {
            sub: "alice".into(),
            role: TokenRole::User,
        };
        assert!(alice.may_act_for("alice"));
        assert!(!alice.may_act_for("bob"));
        assert!(!alice.may_act_for(""));
        assert!(Principal::local_admin().may_act_for("bob"));
        assert!(Principal::local_admin().may_act_for(""));

        let (_d, meta) = meta();
        let iid = InstanceId::from_bytes([7; 8]);
        assert_eq!(meta.instance_owner(&iid).unwrap(), "");
        meta.set_instance_owner(&iid, "alice").unwrap();
        assert_eq!(meta.instance_owner(&iid).unwrap(), "alice");
        assert_eq!(meta.instance_owners().unwrap()[&iid], "alice");
        meta.delete_instance(&iid).unwrap();
        assert_eq!(meta.instance_owner(&iid).unwrap(), "");
    }
}
