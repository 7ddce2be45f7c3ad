//! Pins: a state pinned for a reason (`main`, `tag`, `pr`, `manual`) and a ref is never
//! evicted. An unpinned row stays as a tag, so a webhook naming its ref can pin it again; a
//! state whose only pins are released pull requests is evicted before anything else.

use std::collections::HashMap;

use rusqlite::params;
use taidon_api::{PinInfo, PinReason, PinsChanged};
use taidon_core::policy::PinState;
use taidon_core::StateId;

use crate::meta::{Meta, MetaError};
use crate::{now_ms, Controller, ControllerError};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pins (
    state_id   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    ref_name   TEXT NOT NULL,
    active     INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL,
    PRIMARY KEY (state_id, reason, ref_name)
)";

fn reason(s: &str) -> Result<PinReason, MetaError> {
    s.parse()
        .map_err(|_| MetaError::Corrupt(format!("pin reason {s:?}")))
}

/// Creates the pins table if it is missing.
pub(crate) fn init(meta: &Meta) -> Result<(), MetaError> {
    meta.with(|c| Ok(c.execute_batch(SCHEMA)?))
}

/// Every pin row: (state, pin).
pub(crate) fn all(meta: &Meta) -> Result<Vec<(StateId, PinInfo)>, MetaError> {
    meta.with(|c| {
        let mut stmt =
            c.prepare("SELECT state_id, reason, ref_name, active FROM pins ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (sid, why, ref_name, active) = row?;
            let sid: StateId = sid
                .parse()
                .map_err(|_| MetaError::Corrupt(format!("state id {sid:?}")))?;
            out.push((
                sid,
                PinInfo {
                    reason: reason(&why)?,
                    ref_name,
                    active,
                },
            ));
        }
        Ok(out)
    })
}

/// The policy's view of each pinned or released state.
pub(crate) fn pin_states(meta: &Meta) -> Result<HashMap<StateId, (PinState, String)>, MetaError> {
    let mut out: HashMap<StateId, (PinState, String)> = HashMap::new();
    for (sid, pin) in all(meta)? {
        let label = if pin.ref_name.is_empty() {
            pin.reason.to_string()
        } else {
            format!("{}:{}", pin.reason, pin.ref_name)
        };
        let entry = out.entry(sid).or_insert((PinState::None, String::new()));
        if pin.active {
            if entry.0 != PinState::Pinned {
                *entry = (PinState::Pinned, label);
            }
        } else if pin.reason == PinReason::Pr && entry.0 == PinState::None {
            *entry = (PinState::ReleasedPr, format!("released {label}"));
        }
    }
    out.retain(|_, (p, _)| *p != PinState::None);
    Ok(out)
}

/// Sets `active` on every pin with `ref_name` (and `reason`, if given); how many changed.
pub(crate) fn set_ref(
    meta: &Meta,
    reason: Option<PinReason>,
    ref_name: &str,
    active: bool,
) -> Result<Vec<StateId>, MetaError> {
    let changed: Vec<StateId> = all(meta)?
        .into_iter()
        .filter(|(_, p)| {
            p.ref_name == ref_name && p.active != active && reason.is_none_or(|r| r == p.reason)
        })
        .map(|(s, _)| s)
        .collect();
    meta.with(|c| {
        c.execute(
            "UPDATE pins SET active = ?1, changed_ms = ?2
             WHERE ref_name = ?3 AND (?4 IS NULL OR reason = ?4)",
            params![
                active,
                now_ms() as i64,
                ref_name,
                reason.map(|r| r.to_string())
            ],
        )?;
        Ok(())
    })?;
    Ok(changed)
}

impl Controller {
    fn pins_of(&self, id: StateId) -> Result<PinsChanged, ControllerError> {
        Ok(PinsChanged {
            state_id: id,
            pins: all(&self.meta)?
                .into_iter()
                .filter(|(s, _)| *s == id)
                .map(|(_, p)| p)
                .collect(),
        })
    }

    /// Pins a state given by id or prefix.
    pub fn pin(
        &self,
        typed: &str,
        reason: PinReason,
        ref_name: &str,
    ) -> Result<PinsChanged, ControllerError> {
        let id = self.state_by_prefix(typed)?;
        self.meta.with(|c| {
            c.execute(
                "INSERT INTO pins (state_id, reason, ref_name, active, changed_ms)
                 VALUES (?1, ?2, ?3, 1, ?4)
                 ON CONFLICT(state_id, reason, ref_name) DO UPDATE SET active = 1,
                     changed_ms = excluded.changed_ms",
                params![
                    id.to_string(),
                    reason.to_string(),
                    ref_name,
                    now_ms() as i64
                ],
            )?;
            Ok(())
        })?;
        let detail = format!("{reason} {ref_name}");
        self.meta
            .event(now_ms(), "pinned", Some(&id), None, Some(detail.trim_end()))?;
        self.pins_of(id)
    }

    /// Releases a state's pins (those matching `reason` and `ref_name` when given).
    pub fn unpin(
        &self,
        typed: &str,
        reason: Option<PinReason>,
        ref_name: Option<&str>,
    ) -> Result<PinsChanged, ControllerError> {
        let id = self.state_by_prefix(typed)?;
        self.meta.with(|c| {
            c.execute(
                "UPDATE pins SET active = 0, changed_ms = ?2
                 WHERE state_id = ?1 AND (?3 IS NULL OR reason = ?3)
                   AND (?4 IS NULL OR ref_name = ?4)",
                params![
                    id.to_string(),
                    now_ms() as i64,
                    reason.map(|r| r.to_string()),
                    ref_name
                ],
            )?;
            Ok(())
        })?;
        self.meta
            .event(now_ms(), "unpinned", Some(&id), None, None)?;
        self.pins_of(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_tags_and_released_pull_requests() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("meta.db")).unwrap();
        init(&meta).unwrap();
        let (a, b) = (StateId::from_bytes([1; 32]), StateId::from_bytes([2; 32]));
        meta.with(|c| {
            c.execute_batch(&format!(
                "INSERT INTO pins VALUES ('{a}', 'pr', '42', 1, 0);
                 INSERT INTO pins VALUES ('{b}', 'main', 'main', 0, 0);"
            ))?;
            Ok(())
        })
        .unwrap();
        let p = pin_states(&meta).unwrap();
        assert_eq!(p[&a], (PinState::Pinned, "pr:42".to_owned()));
        assert!(!p.contains_key(&b), "an inactive main tag is no pin");
        // The PR closes: a is released; a push to main pins b.
        assert_eq!(
            set_ref(&meta, Some(PinReason::Pr), "42", false).unwrap(),
            [a]
        );
        assert_eq!(set_ref(&meta, None, "main", true).unwrap(), [b]);
        assert_eq!(
            set_ref(&meta, None, "main", true).unwrap(),
            [],
            "idempotent"
        );
        let p = pin_states(&meta).unwrap();
        assert_eq!(p[&a].0, PinState::ReleasedPr);
        assert_eq!(p[&b].0, PinState::Pinned);
    }
}
