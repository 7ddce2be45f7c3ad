//! Turning API answers into text for people: tables, status lines, progress, errors.

use std::time::Duration;

use taidon_api::{ApiError, InstanceInfo, Removed, StateInfo, Status};

/// `sqlrs: <message>` with each detail line indented under it.
pub(crate) fn with_detail(message: &str, detail: Option<&str>) -> String {
    let mut out = format!("sqlrs: {message}\n");
    for line in detail.unwrap_or("").lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// An API error as the user sees it.
pub(crate) fn api_error(e: &ApiError) -> String {
    with_detail(&e.message, e.detail.as_deref())
}

/// A byte count for people: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How long ago `then_ms` was at `now_ms` (both Unix milliseconds): `12s ago`, `5m ago`.
pub(crate) fn age(then_ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// Seconds with two decimals: `1.23s`.
pub(crate) fn secs2(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// A left-aligned table with a header row; the last column is not padded.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn first12(id: &impl std::fmt::Display) -> String {
    id.to_string().chars().take(12).collect()
}

/// `plan` (steps, ids, where each is cached) and, with `explain`, why each hits or misses.
pub(crate) fn plan(plan: &taidon_api::Plan, explain: bool) -> String {
    let rows: Vec<Vec<String>> = plan
        .steps
        .iter()
        .map(|s| {
            let mut row = vec![
                if s.index == 0 {
                    "base".to_owned()
                } else {
                    s.index.to_string()
                },
                first12(&s.state_id),
                s.cached.clone(),
                s.label.clone(),
            ];
            if explain {
                let verdict = if s.cached == "missing" { "miss" } else { "hit" };
                row.push(format!("{verdict}: {}", s.why));
            }
            row
        })
        .collect();
    let mut head = vec!["STEP", "STATE", "CACHED", "LABEL"];
    if explain {
        head.push("WHY");
    }
    let missing = plan.steps.iter().filter(|s| s.cached == "missing").count();
    let mut out = table(&head, &rows);
    out.push_str(&format!(
        "{} state{}, {} to build\n",
        plan.steps.len(),
        if plan.steps.len() == 1 { "" } else { "s" },
        missing
    ));
    out
}

/// The `ls` tables: states, then instances.
pub(crate) fn ls(states: &[StateInfo], instances: &[InstanceInfo], now_ms: u64) -> String {
    let mut out = String::new();
    if states.is_empty() {
        out.push_str("no states\n");
    } else {
        let rows: Vec<Vec<String>> = states
            .iter()
            .map(|s| {
                vec![
                    first12(&s.state_id),
                    s.parent.map_or_else(|| "-".to_owned(), |p| first12(&p)),
                    s.status.to_string(),
                    human_size(s.size_bytes),
                    format!("{}ms", s.build_cost_ms),
                    format!("{}ms", s.restore_cost_ms),
                    s.access_count.to_string(),
                    format!("{:.3}", s.score),
                    s.pin.clone().unwrap_or_else(|| "-".to_owned()),
                    if s.location.is_empty() {
                        "-".to_owned()
                    } else {
                        s.location.clone()
                    },
                    // Only a client can rebuild it: say so where the step is named.
                    if s.client_only {
                        format!("{} (client replay)", s.label)
                    } else {
                        s.label.clone()
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ID", "PARENT", "STATUS", "SIZE", "BUILD", "RESTORE", "ACCESSES", "SCORE", "PIN",
                "WHERE", "LABEL",
            ],
            &rows,
        ));
    }
    out.push('\n');
    if instances.is_empty() {
        out.push_str("no instances\n");
    } else {
        let rows: Vec<Vec<String>> = instances
            .iter()
            .map(|i| {
                vec![
                    i.instance_id.to_string(),
                    first12(&i.state_id),
                    i.status.clone(),
                    if i.owner.is_empty() {
                        "-".to_owned()
                    } else {
                        i.owner.clone()
                    },
                    age(i.created_ms, now_ms),
                ]
            })
            .collect();
        out.push_str(&table(
            &["ID", "STATE", "STATUS", "OWNER", "CREATED"],
            &rows,
        ));
    }
    out
}

/// `status` as `key: value` lines.
pub(crate) fn status(s: &Status) -> String {
    let pairs = [
        ("daemon pid", s.pid.to_string()),
        ("version", s.version.clone()),
        ("home", s.home.display().to_string()),
        ("api", s.api_url.clone()),
        ("gateway", s.gateway.clone()),
        ("engine", s.engine_version.clone()),
        ("engine bin dir", s.engine_bin_dir.display().to_string()),
        (
            "engines",
            if s.engines.is_empty() {
                "-".to_owned()
            } else {
                s.engines
                    .iter()
                    .map(|e| {
                        format!(
                            "{}.{}{} ({})",
                            e.major,
                            e.minor,
                            if e.default { " default" } else { "" },
                            e.bin_dir.display()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("clone strategy", s.clone_strategy.to_string()),
        ("store", s.store_path.display().to_string()),
        (
            "store usage",
            if s.store_capacity_bytes > 0 {
                format!(
                    "{} of {}",
                    human_size(s.store_bytes),
                    human_size(s.store_capacity_bytes)
                )
            } else {
                human_size(s.store_bytes)
            },
        ),
        ("states", s.states.to_string()),
        (
            "running instances",
            format!(
                "{} of {} ({} standby)",
                s.instances_running, s.max_instances, s.standby_instances
            ),
        ),
        ("server user", s.server_user.clone()),
    ];
    let mut pairs = pairs.to_vec();
    if let Some(r) = &s.remote {
        pairs.push(("remote", r.url.clone()));
        pairs.push((
            "remote status",
            match &r.error {
                None if r.reachable => "reachable".to_owned(),
                Some(e) => format!("unreachable: {e} (working locally)"),
                None => "unreachable (working locally)".to_owned(),
            },
        ));
        pairs.push((
            "remote usage",
            if r.capacity_bytes > 0 {
                format!(
                    "{} of {} in {} snapshots",
                    human_size(r.bytes),
                    human_size(r.capacity_bytes),
                    r.snapshots
                )
            } else {
                format!("{} in {} snapshots", human_size(r.bytes), r.snapshots)
            },
        ));
        pairs.push(("pending uploads", r.pending_uploads.to_string()));
    }
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// What `push` did, one line.
/// `sqlrs leases`: one row per lease, oldest first.
pub(crate) fn leases(leases: &[taidon_api::LeaseInfo], now_ms: u64) -> String {
    if leases.is_empty() {
        return "no leases\n".to_owned();
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            let left_s = l.expires_ms.saturating_sub(now_ms) / 1000;
            vec![
                l.lease.to_string(),
                l.state_id.short().to_string(),
                l.isolation.to_string(),
                l.database.clone(),
                age(l.created_ms, now_ms),
                format!("{}m{:02}s", left_s / 60, left_s % 60),
                l.owner.clone(),
            ]
        })
        .collect();
    table(
        &[
            "LEASE",
            "STATE",
            "ISOLATION",
            "DATABASE",
            "AGE",
            "EXPIRES IN",
            "OWNER",
        ],
        &rows,
    )
}

pub(crate) fn pushed(p: &taidon_api::Pushed) -> String {
    if p.already_there && p.chunks_uploaded == 0 {
        format!("state {} is already in {}\n", first12(&p.state_id), p.url)
    } else {
        format!(
            "pushed state {} to {}: {} chunk{} ({}) uploaded, {} already there\n",
            first12(&p.state_id),
            p.url,
            p.chunks_uploaded,
            if p.chunks_uploaded == 1 { "" } else { "s" },
            human_size(p.bytes_uploaded),
            p.chunks_skipped
        )
    }
}

/// `fsck`: one line per finding (kind, short id, detail, whether repaired), then a summary.
pub(crate) fn fsck(r: &taidon_api::FsckReport) -> String {
    let mut out = String::new();
    for f in &r.findings {
        let id = match (&f.state_id, &f.instance_id) {
            (_, Some(iid)) => format!("instance {}", first12(iid)),
            (Some(sid), None) => format!("state {}", first12(sid)),
            (None, None) => "-".to_owned(),
        };
        let path = f
            .path
            .as_deref()
            .map(|p| format!(" [{p}]"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<22} {id}: {}{path} ({})\n",
            f.kind.as_str(),
            f.detail,
            if f.repaired {
                "repaired"
            } else {
                "NOT repaired"
            }
        ));
    }
    let checked = format!(
        "{} snapshot{} checked ({} read{}) in {} ms",
        r.snapshots_checked,
        if r.snapshots_checked == 1 { "" } else { "s" },
        human_size(r.bytes_read),
        if r.snapshots_skipped > 0 {
            format!(", {} skipped: in use by a build", r.snapshots_skipped)
        } else {
            String::new()
        },
        r.elapsed_ms
    );
    let unrepaired = r.unrepaired();
    if r.findings.is_empty() {
        out.push_str(&format!("no problems found: {checked}\n"));
    } else if unrepaired == 0 {
        out.push_str(&format!(
            "{} problem(s) found, all repaired: {checked}\n",
            r.findings.len()
        ));
    } else {
        out.push_str(&format!(
            "{} problem(s) found, {unrepaired} not repaired{}: {checked}\n",
            r.findings.len(),
            if r.repair {
                ""
            } else {
                " (sqlrs fsck --repair fixes what it can)"
            }
        ));
    }
    out
}

/// What `rm` removed, one line each.
pub(crate) fn removed(r: &Removed) -> String {
    let mut out = String::new();
    for s in &r.states {
        out.push_str(&format!("removed state {s}\n"));
    }
    for i in &r.instances {
        out.push_str(&format!("removed instance {i}\n"));
    }
    if out.is_empty() {
        out.push_str("nothing removed\n");
    }
    out
}

#[cfg(test)]
mod fsck_tests {
    use taidon_api::{Finding, FindingKind, FsckReport};

    #[test]
    fn fsck_lists_each_finding_then_a_summary() {
        let clean = FsckReport {
            snapshots_checked: 3,
            bytes_read: 2048,
            ..Default::default()
        };
        assert!(super::fsck(&clean)
            .starts_with("no problems found: 3 snapshots checked (2.0 KiB read)"));
        let r = FsckReport {
            findings: vec![Finding {
                kind: FindingKind::ChecksumMismatch,
                state_id: Some(taidon_core::StateId::from_bytes([0xab; 32])),
                instance_id: None,
                path: None,
                detail: "size 10 bytes, manifest says 9".into(),
                repaired: false,
            }],
            snapshots_checked: 1,
            ..Default::default()
        };
        let text = super::fsck(&r);
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("checksum_mismatch"), "{text}");
        assert!(
            first.contains("state abababababab: size 10 bytes"),
            "{text}"
        );
        assert!(first.ends_with("(NOT repaired)"), "{text}");
        assert!(
            text.contains("1 problem(s) found, 1 not repaired"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use taidon_api::{CloneStrategy, StateStatus};
    use taidon_core::{InstanceId, StateId};

    use super::*;

    fn sid(b: u8) -> StateId {
        StateId::from_bytes([b; 32])
    }

    #[test]
    fn sizes_ages_and_durations() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
        assert_eq!(human_size(u64::MAX), "16384.0 PiB");
        assert_eq!(age(1_000, 13_500), "12s ago");
        assert_eq!(age(0, 5 * 60_000 + 1), "5m ago");
        assert_eq!(age(0, 3 * 3_600_000), "3h ago");
        assert_eq!(age(0, 49 * 3_600_000), "2d ago");
        assert_eq!(age(10_000, 0), "0s ago");
        assert_eq!(secs2(Duration::from_millis(1234)), "1.23s");
    }

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let t = table(
            &["ID", "NAME"],
            &[
                vec!["a".into(), "x".into()],
                vec!["long-id".into(), "y".into()],
            ],
        );
        assert_eq!(t, "ID       NAME\na        x\nlong-id  y\n");
    }

    fn state(b: u8, parent: Option<StateId>, label: &str) -> StateInfo {
        StateInfo {
            state_id: sid(b),
            parent,
            label: label.into(),
            status: StateStatus::Hot,
            size_bytes: 2048,
            build_cost_ms: 1234,
            restore_cost_ms: 10,
            created_ms: 0,
            last_access_ms: 0,
            access_count: 7,
            instances: 1,
            score: 0.5,
            pin: Some("main:main".into()),
            status_reason: None,
            location: "local+remote".into(),
            client_only: false,
        }
    }

    #[test]
    fn ls_shows_both_tables_with_short_ids() {
        let states = [
            state(0xaa, None, "PostgreSQL 15.18"),
            state(0xbb, Some(sid(0xaa)), "schema.sql"),
        ];
        let instances = [InstanceInfo {
            instance_id: InstanceId::from_bytes([0x3f; 8]),
            state_id: sid(0xbb),
            status: "running".into(),
            dsn: "postgres://x".into(),
            created_ms: 1_000,
            clone_ms: 5,
            start_ms: 300,
            owner: "alice".into(),
        }];
        let out = ls(&states, &instances, 61_000);
        let want = "\
ID            PARENT        STATUS  SIZE     BUILD   RESTORE  ACCESSES  SCORE  PIN        WHERE         LABEL
aaaaaaaaaaaa  -             HOT     2.0 KiB  1234ms  10ms     7         0.500  main:main  local+remote  PostgreSQL 15.18
bbbbbbbbbbbb  aaaaaaaaaaaa  HOT     2.0 KiB  1234ms  10ms     7         0.500  main:main  local+remote  schema.sql

ID                STATE         STATUS   OWNER  CREATED
3f3f3f3f3f3f3f3f  bbbbbbbbbbbb  running  alice  1m ago
";
        assert_eq!(out, want);
        assert_eq!(ls(&[], &[], 0), "no states\n\nno instances\n");
    }

    #[test]
    fn status_is_aligned_key_value_lines() {
        let s = Status {
            pid: 42,
            version: "0.1.0".into(),
            home: PathBuf::from("/var/lib/taidon"),
            api_url: "http://127.0.0.1:7070".into(),
            gateway: "127.0.0.1:6432".into(),
            engine_version: "PostgreSQL 15.18".into(),
            engine_bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            clone_strategy: CloneStrategy::Copy,
            store_path: PathBuf::from("/var/lib/taidon/store"),
            store_bytes: 5 << 20,
            states: 3,
            instances_running: 1,
            server_user: "postgres".into(),
            store_capacity_bytes: 20 << 20,
            max_instances: 16,
            standby_instances: 0,
            remote: None,
            engines: Vec::new(),
        };
        let out = status(&s);
        assert!(out.starts_with("daemon pid:        42\n"), "{out}");
        assert!(out.contains("\nclone strategy:    copy\n"), "{out}");
        assert!(
            out.contains("\nstore usage:       5.0 MiB of 20.0 MiB\n"),
            "{out}"
        );
        assert!(
            out.contains("\nrunning instances: 1 of 16 (0 standby)\n"),
            "{out}"
        );
        assert!(out.ends_with("server user:       postgres\n"), "{out}");
        assert_eq!(out.lines().count(), 14);

        let mut s = s;
        s.remote = Some(taidon_api::RemoteInfo {
            url: "s3://snaps/team".into(),
            reachable: false,
            error: Some("cannot list s3://snaps/team: 403 Forbidden".into()),
            pending_uploads: 2,
            bytes: 3 << 20,
            snapshots: 4,
            capacity_bytes: 0,
        });
        let out = status(&s);
        assert!(
            out.contains("\nremote:            s3://snaps/team\n"),
            "{out}"
        );
        assert!(
            out.contains("\nremote status:     unreachable: cannot list s3://snaps/team: 403 Forbidden (working locally)\n"),
            "{out}"
        );
        assert!(
            out.contains("\nremote usage:      3.0 MiB in 4 snapshots\n"),
            "{out}"
        );
        assert!(out.ends_with("pending uploads:   2\n"), "{out}");
    }

    #[test]
    fn errors_indent_their_detail() {
        let e = ApiError::new(
            taidon_api::ErrorKind::StepFailed,
            "step 2/3 seed.sql failed",
        )
        .with_detail("psql:seed.sql:4: ERROR:  boom\nLINE 1: x");
        assert_eq!(
            api_error(&e),
            "sqlrs: step 2/3 seed.sql failed\n  psql:seed.sql:4: ERROR:  boom\n  LINE 1: x\n"
        );
        assert_eq!(with_detail("x", None), "sqlrs: x\n");
    }

    #[test]
    fn removed_lists_each_thing() {
        let r = Removed {
            states: vec![sid(1)],
            instances: vec![InstanceId::from_bytes([2; 8])],
        };
        assert_eq!(
            removed(&r),
            format!(
                "removed state {}\nremoved instance 0202020202020202\n",
                sid(1)
            )
        );
        let none = Removed {
            states: vec![],
            instances: vec![],
        };
        assert_eq!(removed(&none), "nothing removed\n");
    }
}
