//! Metadata in SQLite (WAL): states, instances and events.
//!
//! The snapshot store is the truth about which snapshots exist; these rows carry what the
//! lifecycle policy needs (costs, access counts, status) and are reconciled against the store
//! at start.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use taidon_api::StateStatus;
use taidon_core::{InstanceId, StateId};

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("metadata row is corrupt: {0}")]
    Corrupt(String),
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS states (
    state_id           TEXT PRIMARY KEY,
    parent             TEXT,
    label              TEXT NOT NULL,
    inputs_fingerprint TEXT NOT NULL,
    engine_fingerprint TEXT NOT NULL,
    status             TEXT NOT NULL,
    status_reason      TEXT,
    size_bytes         INTEGER NOT NULL DEFAULT 0,
    build_cost_ms      INTEGER NOT NULL DEFAULT 0,
    restore_cost_ms    INTEGER NOT NULL DEFAULT 0,
    created_ms         INTEGER NOT NULL,
    last_access_ms     INTEGER NOT NULL,
    access_count       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    state_id    TEXT NOT NULL,
    status      TEXT NOT NULL,
    port        INTEGER NOT NULL,
    pid         INTEGER NOT NULL, -- unused: the runtime knows its servers (0 since)
    password    TEXT NOT NULL,
    data_dir    TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    clone_ms    INTEGER NOT NULL,
    start_ms    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    state_id    TEXT,
    instance_id TEXT,
    detail      TEXT
);
"#;

/// A state row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    pub state_id: StateId,
    pub parent: Option<StateId>,
    pub label: String,
    /// JSON of the step (or the engine, for a base): what the id was computed from.
    pub inputs_fingerprint: String,
    pub engine_fingerprint: String,
    pub status: StateStatus,
    pub status_reason: Option<String>,
    pub size_bytes: u64,
    pub build_cost_ms: u64,
    pub restore_cost_ms: u64,
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub access_count: u64,
}

/// An instance row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub instance_id: InstanceId,
    pub state_id: StateId,
    pub status: String,
    pub port: u16,
    pub password: String,
    pub data_dir: String,
    pub created_ms: u64,
    pub clone_ms: u64,
    pub start_ms: u64,
}

/// How many states have each recorded status, and which are recorded HOT.
#[derive(Debug, Default)]
pub struct StatusCounts {
    pub counts: Vec<(StateStatus, u64)>,
    pub hot: Vec<StateId>,
}

/// The metadata database.
pub struct Meta {
    conn: Mutex<Connection>,
}

fn parse_status(s: &str) -> Result<StateStatus, MetaError> {
    Ok(match s {
        "HOT" => StateStatus::Hot,
        "WARM" => StateStatus::Warm,
        "COLD" => StateStatus::Cold,
        "BUILDING" => StateStatus::Building,
        "STARTING" => StateStatus::Starting,
        "FAILED" => StateStatus::Failed,
        other => return Err(MetaError::Corrupt(format!("state status {other:?}"))),
    })
}

fn parse_id<T: std::str::FromStr>(s: String) -> Result<T, MetaError> {
    s.parse()
        .map_err(|_| MetaError::Corrupt(format!("id {s:?}")))
}

impl Meta {
    /// Opens (creating) the database at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::tokens::SCHEMA)?;
        conn.execute_batch(crate::leases::SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls back.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    /// Inserts or replaces the identity of a state, keeping its counters if it exists.
    pub fn upsert_state(&self, row: &StateRow) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO states (state_id, parent, label, inputs_fingerprint, engine_fingerprint,
                     status, status_reason, size_bytes, build_cost_ms, restore_cost_ms, created_ms,
                     last_access_ms, access_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT(state_id) DO UPDATE SET
                     status = excluded.status, status_reason = excluded.status_reason,
                     size_bytes = excluded.size_bytes, build_cost_ms = excluded.build_cost_ms",
                params![
                    row.state_id.to_string(),
                    row.parent.map(|p| p.to_string()),
                    row.label,
                    row.inputs_fingerprint,
                    row.engine_fingerprint,
                    row.status.to_string(),
                    row.status_reason,
                    row.size_bytes as i64,
                    row.build_cost_ms as i64,
                    row.restore_cost_ms as i64,
                    row.created_ms as i64,
                    row.last_access_ms as i64,
                    row.access_count as i64,
                ],
            )?;
            Ok(())
        })
    }

    pub fn set_state_status(
        &self,
        id: &StateId,
        status: StateStatus,
        reason: Option<&str>,
    ) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "UPDATE states SET status = ?2, status_reason = ?3 WHERE state_id = ?1",
                params![id.to_string(), status.to_string(), reason],
            )?;
            Ok(())
        })
    }

    /// Records a use of a state: one more access, now, and what restoring it cost.
    pub fn touch_state(
        &self,
        id: &StateId,
        now_ms: u64,
        restore_cost_ms: Option<u64>,
    ) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "UPDATE states SET access_count = access_count + 1, last_access_ms = ?2,
                     restore_cost_ms = COALESCE(?3, restore_cost_ms)
                 WHERE state_id = ?1",
                params![
                    id.to_string(),
                    now_ms as i64,
                    restore_cost_ms.map(|v| v as i64)
                ],
            )?;
            Ok(())
        })
    }

    pub fn delete_state(&self, id: &StateId) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM states WHERE state_id = ?1",
                params![id.to_string()],
            )?;
            Ok(())
        })
    }

    pub fn states(&self) -> Result<Vec<StateRow>, MetaError> {
        self.query_states("ORDER BY created_ms, state_id", [])
    }

    /// The states the clause after `FROM states` selects.
    fn query_states<P: rusqlite::Params>(
        &self,
        clause: &str,
        params: P,
    ) -> Result<Vec<StateRow>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT state_id, parent, label, inputs_fingerprint, engine_fingerprint, status,
                        status_reason, size_bytes, build_cost_ms, restore_cost_ms, created_ms,
                        last_access_ms, access_count
                 FROM states {clause}"
            ))?;
            let rows = stmt.query_map(params, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    [
                        r.get::<_, i64>(7)?,
                        r.get::<_, i64>(8)?,
                        r.get::<_, i64>(9)?,
                        r.get::<_, i64>(10)?,
                        r.get::<_, i64>(11)?,
                        r.get::<_, i64>(12)?,
                    ],
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, parent, label, inputs, engine, status, reason, n) = row?;
                out.push(StateRow {
                    state_id: parse_id(id)?,
                    parent: parent.map(parse_id).transpose()?,
                    label,
                    inputs_fingerprint: inputs,
                    engine_fingerprint: engine,
                    status: parse_status(&status)?,
                    status_reason: reason,
                    size_bytes: n[0] as u64,
                    build_cost_ms: n[1] as u64,
                    restore_cost_ms: n[2] as u64,
                    created_ms: n[3] as u64,
                    last_access_ms: n[4] as u64,
                    access_count: n[5] as u64,
                });
            }
            Ok(out)
        })
    }

    /// How many states have each recorded status, and the ids of those recorded HOT (few):
    /// what metrics need, without reading every row into memory.
    pub fn state_status_counts(&self) -> Result<StatusCounts, MetaError> {
        self.with(|c| {
            let mut counts = Vec::new();
            let mut stmt =
                c.prepare_cached("SELECT status, count(*) FROM states GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (status, n) = row?;
                counts.push((parse_status(&status)?, n as u64));
            }
            let mut stmt = c.prepare_cached("SELECT state_id FROM states WHERE status = 'HOT'")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut hot = Vec::new();
            for row in rows {
                hot.push(parse_id(row?)?);
            }
            Ok(StatusCounts { counts, hot })
        })
    }

    /// The recorded status of each of `ids` that exists.
    pub fn statuses_of(&self, ids: &[StateId]) -> Result<Vec<(StateId, StateStatus)>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT status FROM states WHERE state_id = ?1")?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let status: Option<String> = stmt
                    .query_row(params![id.to_string()], |r| r.get(0))
                    .optional()?;
                if let Some(s) = status {
                    out.push((*id, parse_status(&s)?));
                }
            }
            Ok(out)
        })
    }

    /// How many instances have each status.
    pub fn instance_status_counts(&self) -> Result<Vec<(String, u64)>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT status, count(*) FROM instances GROUP BY status ORDER BY status",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (status, n) = row?;
                out.push((status, n as u64));
            }
            Ok(out)
        })
    }

    pub fn state(&self, id: &StateId) -> Result<Option<StateRow>, MetaError> {
        Ok(self
            .query_states("WHERE state_id = ?1", params![id.to_string()])?
            .into_iter()
            .next())
    }

    pub fn insert_instance(&self, row: &InstanceRow) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO instances (instance_id, state_id, status, port, pid,
                     password, data_dir, created_ms, clone_ms, start_ms)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9)",
                params![
                    row.instance_id.to_string(),
                    row.state_id.to_string(),
                    row.status,
                    row.port,
                    row.password,
                    row.data_dir,
                    row.created_ms as i64,
                    row.clone_ms as i64,
                    row.start_ms as i64,
                ],
            )?;
            Ok(())
        })
    }

    pub fn delete_instance(&self, id: &InstanceId) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM instances WHERE instance_id = ?1",
                params![id.to_string()],
            )?;
            c.execute(
                "DELETE FROM instance_owners WHERE instance_id = ?1",
                params![id.to_string()],
            )?;
            Ok(())
        })
    }

    pub fn instances(&self) -> Result<Vec<InstanceRow>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT instance_id, state_id, status, port, password, data_dir, created_ms,
                        clone_ms, start_ms
                 FROM instances ORDER BY created_ms, instance_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u16>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    [
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, i64>(8)?,
                    ],
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (iid, sid, status, port, password, data_dir, n) = row?;
                out.push(InstanceRow {
                    instance_id: parse_id(iid)?,
                    state_id: parse_id(sid)?,
                    status,
                    port,
                    password,
                    data_dir,
                    created_ms: n[0] as u64,
                    clone_ms: n[1] as u64,
                    start_ms: n[2] as u64,
                });
            }
            Ok(out)
        })
    }

    pub fn event(
        &self,
        now_ms: u64,
        kind: &str,
        state: Option<&StateId>,
        instance: Option<&InstanceId>,
        detail: Option<&str>,
    ) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO events (ts_ms, kind, state_id, instance_id, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    now_ms as i64,
                    kind,
                    state.map(|s| s.to_string()),
                    instance.map(|i| i.to_string()),
                    detail
                ],
            )?;
            Ok(())
        })
    }

    /// The kinds of the events recorded for a state, oldest first.
    pub fn event_kinds(&self, state: &StateId) -> Result<Vec<String>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT kind FROM events WHERE state_id = ?1 ORDER BY id")?;
            let kinds = stmt
                .query_map(params![state.to_string()], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(kinds)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u8, parent: Option<u8>) -> StateRow {
        StateRow {
            state_id: StateId::from_bytes([id; 32]),
            parent: parent.map(|p| StateId::from_bytes([p; 32])),
            label: format!("step {id}"),
            inputs_fingerprint: "{}".into(),
            engine_fingerprint: "{}".into(),
            status: StateStatus::Building,
            status_reason: None,
            size_bytes: 0,
            build_cost_ms: 0,
            restore_cost_ms: 0,
            created_ms: id as u64,
            last_access_ms: id as u64,
            access_count: 0,
        }
    }

    #[test]
    fn states_upsert_touch_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("meta.db")).unwrap();
        meta.upsert_state(&row(1, None)).unwrap();
        meta.upsert_state(&row(2, Some(1))).unwrap();
        meta.touch_state(&StateId::from_bytes([2; 32]), 99, Some(7))
            .unwrap();
        let mut done = row(2, Some(1));
        done.status = StateStatus::Warm;
        done.size_bytes = 1234;
        done.build_cost_ms = 55;
        meta.upsert_state(&done).unwrap();
        let s = meta.state(&StateId::from_bytes([2; 32])).unwrap().unwrap();
        assert_eq!(s.status, StateStatus::Warm);
        assert_eq!((s.size_bytes, s.build_cost_ms), (1234, 55));
        // Counters survive the upsert.
        assert_eq!(
            (s.access_count, s.last_access_ms, s.restore_cost_ms),
            (1, 99, 7)
        );
        assert_eq!(s.parent, Some(StateId::from_bytes([1; 32])));
        meta.delete_state(&StateId::from_bytes([1; 32])).unwrap();
        assert_eq!(meta.states().unwrap().len(), 1);
    }

    #[test]
    fn instances_and_events_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("meta.db")).unwrap();
        let inst = InstanceRow {
            instance_id: InstanceId::from_bytes([9; 8]),
            state_id: StateId::from_bytes([2; 32]),
            status: "running".into(),
            port: 5433,
            password: "pw".into(),
            data_dir: "/x".into(),
            created_ms: 1,
            clone_ms: 2,
            start_ms: 3,
        };
        meta.insert_instance(&inst).unwrap();
        assert_eq!(meta.instances().unwrap(), vec![inst.clone()]);
        meta.delete_instance(&inst.instance_id).unwrap();
        assert!(meta.instances().unwrap().is_empty());
        meta.event(1, "built", Some(&inst.state_id), None, None)
            .unwrap();
        meta.event(
            2,
            "instance_started",
            Some(&inst.state_id),
            Some(&inst.instance_id),
            None,
        )
        .unwrap();
        assert_eq!(
            meta.event_kinds(&inst.state_id).unwrap(),
            ["built", "instance_started"]
        );
    }
}
