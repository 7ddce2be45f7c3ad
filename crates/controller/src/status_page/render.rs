//! The status page's HTML: pure functions from plain data to a string. Every string that
//! comes from outside (labels, reasons, owners, event details) goes through [`escape`].

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use taidon_api::{EventInfo, StateInfo, StateStatus};
use taidon_core::{InstanceId, StateId};

use super::history::{chart_svg, Sample};

/// Seconds between two loads of the page.
pub(crate) const REFRESH_S: u32 = 10;

/// Everything the page shows, gathered at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Page {
    pub(crate) now_ms: u64,
    pub(crate) version: String,
    /// Who is looking: the token's subject and role (never the token).
    pub(crate) viewer: String,
    pub(crate) states: Vec<StateInfo>,
    pub(crate) instances: Vec<InstanceLine>,
    /// Newest first.
    pub(crate) events: Vec<EventInfo>,
    /// Oldest first.
    pub(crate) samples: Vec<Sample>,
    /// 0: no limit set.
    pub(crate) store_capacity_bytes: u64,
    pub(crate) max_instances: u64,
}

/// One instance as the page shows it.
#[derive(Debug, Clone)]
pub(crate) struct InstanceLine {
    pub(crate) instance_id: InstanceId,
    pub(crate) state_id: StateId,
    pub(crate) owner: String,
    pub(crate) status: String,
    pub(crate) created_ms: u64,
    /// When a client or the controller last used it; `None` when it is not running.
    pub(crate) last_activity_ms: Option<u64>,
    pub(crate) connections: u32,
}

/// `s` safe inside HTML text and inside a quoted attribute value.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.5 GiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 07 min`, `3 d 04 h`.
pub(crate) fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {:02} s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {:02} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `2026-11-29 06:41:07 UTC`.
pub(crate) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The CSS class and the text of a state's presence.
pub(crate) fn presence(status: StateStatus) -> (&'static str, &'static str) {
    match status {
        StateStatus::Hot => ("hot", "Hot"),
        StateStatus::Warm => ("warm", "Warm"),
        StateStatus::Cold => ("cold", "Cold"),
        StateStatus::Building => ("building", "Building"),
        StateStatus::Starting => ("starting", "Starting"),
        StateStatus::Failed => ("failed", "Failed"),
    }
}

/// The first 12 hex digits of an id.
fn prefix(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// An id as its 12-digit prefix, the full id in its title.
fn id_cell(id: &str) -> String {
    let id = escape(id);
    format!(r#"<code title="{id}">{}</code>"#, prefix(&id))
}

/// The states in tree order (each parent before its children, children by creation), with
/// their depth. A state whose parent is not listed is a root.
pub(crate) fn tree_order(states: &[StateInfo]) -> Vec<(&StateInfo, usize)> {
    let known: HashSet<StateId> = states.iter().map(|s| s.state_id).collect();
    let mut children: HashMap<Option<StateId>, Vec<&StateInfo>> = HashMap::new();
    for s in states {
        let parent = s.parent.filter(|p| known.contains(p));
        children.entry(parent).or_default().push(s);
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| (s.created_ms, s.state_id.to_string()));
    }
    let mut out = Vec::with_capacity(states.len());
    let mut seen = HashSet::new();
    let mut stack: Vec<(&StateInfo, usize)> = children
        .get(&None)
        .map(|roots| roots.iter().rev().map(|s| (*s, 0)).collect())
        .unwrap_or_default();
    while let Some((s, depth)) = stack.pop() {
        if !seen.insert(s.state_id) {
            continue;
        }
        out.push((s, depth));
        if let Some(kids) = children.get(&Some(s.state_id)) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    out
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{display:flex;align-items:center;gap:1.5em;padding:.6em 1.2em;background:#24292f;color:#fff}
header h1{font-size:1.1em;margin:0;white-space:nowrap}
header button{white-space:nowrap}
header .facts{display:flex;gap:1.2em;flex-wrap:wrap}
header form{margin-left:auto}
main{padding:1em 1.2em;display:grid;gap:1.2em}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;overflow-x:auto}
h2{font-size:1em;margin:.2em 0 .6em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #eaeef2;white-space:nowrap}
th{font-weight:600;color:#57606a}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.detail{white-space:normal}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.tree{display:inline-block;color:#8c959f}
.presence{display:inline-block;min-width:5.5em;padding:0 .5em;border-radius:1em;font-size:12px;font-weight:600;text-align:center}
.presence.hot{background:#ffd8d3;color:#a40e26}
.presence.warm{background:#fff1c2;color:#7d4e00}
.presence.cold{background:#ddf4ff;color:#0550ae}
.presence.building,.presence.starting{background:#eaeef2;color:#57606a}
.presence.failed{background:#24292f;color:#fff}
.muted{color:#8c959f}
.chart .axis{font-size:11px;fill:#57606a}
.chart .legend{font-size:12px}
.chart .legend.bytes{fill:#1f6feb}
.chart .legend.instances{fill:#d97706}
.chart .empty{font-size:14px;fill:#8c959f}
.login{max-width:24em;margin:4em auto;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:1.2em 1.5em}
.login input{width:100%;box-sizing:border-box;padding:.4em;margin:.3em 0 .8em}
.error{color:#a40e26}
"#;

fn head(title: &str, refresh: bool) -> String {
    let refresh = if refresh {
        format!(r#"<meta http-equiv="refresh" content="{REFRESH_S}">"#)
    } else {
        String::new()
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">{refresh}<title>{}</title><style>{STYLE}</style></head>"#,
        escape(title)
    )
}

/// The form asking for the API token; `message` says why it is shown again.
pub(crate) fn login(message: Option<&str>) -> String {
    let mut html = head("Taidon: sign in", false);
    html.push_str(
        r#"<body><form class="login" id="login" method="post" action="/login"><h1>Taidon</h1>"#,
    );
    if let Some(m) = message {
        let _ = write!(html, r#"<p class="error" role="alert">{}</p>"#, escape(m));
    }
    html.push_str(
        r#"<label for="token">API token</label><input id="token" name="token" type="password" autocomplete="current-password" required autofocus><button type="submit">Sign in</button><p class="muted">The token is in the data home's <code>api.token</code>, or make one with <code>taidon token create</code>.</p></form></body></html>"#,
    );
    html
}

/// The status page.
pub(crate) fn page(p: &Page) -> String {
    let mut html = head("Taidon status", true);
    html.push_str("<body>");
    header(&mut html, p);
    html.push_str("<main>");
    states_section(&mut html, p);
    instances_section(&mut html, p);
    let _ = write!(
        html,
        r#"<section id="usage"><h2>Store usage and instances, last hour</h2>{}</section>"#,
        chart_svg(&p.samples, p.now_ms)
    );
    events_section(&mut html, p);
    html.push_str("</main></body></html>");
    html
}

fn header(html: &mut String, p: &Page) {
    let store = p.samples.last().map_or_else(
        || "—".to_owned(),
        |s| {
            if p.store_capacity_bytes > 0 {
                format!(
                    "{} of {}",
                    human_bytes(s.store_bytes),
                    human_bytes(p.store_capacity_bytes)
                )
            } else {
                human_bytes(s.store_bytes)
            }
        },
    );
    let running = p.instances.iter().filter(|i| i.status == "running").count();
    let _ = write!(
        html,
        r#"<header><h1>Taidon {}</h1><div class="facts"><span>{} states</span><span>store {}</span><span>{running} of {} instances running</span><span class="muted">as of {}, refreshed every {REFRESH_S} s</span><span class="muted">signed in as {}</span></div><form method="post" action="/logout"><button type="submit">Sign out</button></form></header>"#,
        escape(&p.version),
        p.states.len(),
        escape(&store),
        p.max_instances,
        utc(p.now_ms),
        escape(&p.viewer),
    );
}

fn states_section(html: &mut String, p: &Page) {
    html.push_str(r#"<section id="states"><h2>States</h2>"#);
    if p.states.is_empty() {
        html.push_str(r#"<p class="muted">No states yet: <code>sqlrs prepare</code> makes some.</p></section>"#);
        return;
    }
    html.push_str(
        r#"<table><thead><tr><th>State</th><th>Presence</th><th>Label</th><th>Size</th><th>Build cost</th><th>Restore cost</th><th>Score</th><th>Pin</th><th>Where</th><th>Instances</th></tr></thead><tbody>"#,
    );
    for (s, depth) in tree_order(&p.states) {
        let id = s.state_id.to_string();
        let parent = s.parent.map(|p| p.to_string()).unwrap_or_default();
        let (class, text) = presence(s.status);
        let reason = s
            .status_reason
            .as_deref()
            .map(|r| format!(r#" title="{}""#, escape(r)))
            .unwrap_or_default();
        let indent = if depth == 0 {
            String::new()
        } else {
            format!(
                r#"<span class="tree" style="padding-left:{}em">└─</span> "#,
                (depth - 1) as f64 * 1.4
            )
        };
        let _ = write!(
            html,
            r#"<tr class="state" data-state-id="{}" data-parent="{}" data-depth="{depth}"><td>{indent}{}</td><td><span class="presence {class}"{reason}>{text}</span></td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.2}</td><td>{}</td><td>{}</td><td class="num">{}</td></tr>"#,
            escape(&id),
            escape(&parent),
            id_cell(&id),
            escape(&s.label),
            human_bytes(s.size_bytes),
            human_ms(s.build_cost_ms),
            human_ms(s.restore_cost_ms),
            s.score,
            s.pin.as_deref().map_or_else(String::new, escape),
            escape(&s.location),
            s.instances,
        );
    }
    html.push_str("</tbody></table></section>");
}

fn instances_section(html: &mut String, p: &Page) {
    html.push_str(r#"<section id="instances"><h2>Instances</h2>"#);
    if p.instances.is_empty() {
        html.push_str(r#"<p class="muted">No instances.</p></section>"#);
        return;
    }
    html.push_str(
        r#"<table><thead><tr><th>Instance</th><th>State</th><th>Owner</th><th>Status</th><th>Age</th><th>Idle</th></tr></thead><tbody>"#,
    );
    for i in &p.instances {
        let id = i.instance_id.to_string();
        let idle = match i.last_activity_ms {
            None => r#"<span class="muted">—</span>"#.to_owned(),
            Some(_) if i.connections > 0 => format!("in use ({} conn.)", i.connections),
            Some(at) => human_ms(p.now_ms.saturating_sub(at)),
        };
        let owner = if i.owner.is_empty() {
            r#"<span class="muted">—</span>"#.to_owned()
        } else {
            escape(&i.owner)
        };
        let _ = write!(
            html,
            r#"<tr class="instance" data-instance-id="{}"><td>{}</td><td>{}</td><td>{owner}</td><td>{}</td><td class="num">{}</td><td class="num">{idle}</td></tr>"#,
            escape(&id),
            id_cell(&id),
            id_cell(&i.state_id.to_string()),
            escape(&i.status),
            human_ms(p.now_ms.saturating_sub(i.created_ms)),
        );
    }
    html.push_str("</tbody></table></section>");
}

fn events_section(html: &mut String, p: &Page) {
    html.push_str(r#"<section id="events"><h2>Recent events</h2>"#);
    if p.events.is_empty() {
        html.push_str(r#"<p class="muted">No events yet.</p></section>"#);
        return;
    }
    html.push_str(
        r#"<table><thead><tr><th>When</th><th>Event</th><th>State</th><th>Instance</th><th>Detail</th></tr></thead><tbody>"#,
    );
    for e in &p.events {
        let state = e
            .state_id
            .map(|s| id_cell(&s.to_string()))
            .unwrap_or_default();
        let instance = e
            .instance_id
            .map(|i| id_cell(&i.to_string()))
            .unwrap_or_default();
        let _ = write!(
            html,
            r#"<tr class="event"><td title="{}">{} ago</td><td>{}</td><td>{state}</td><td>{instance}</td><td class="detail">{}</td></tr>"#,
            utc(e.ts_ms),
            human_ms(p.now_ms.saturating_sub(e.ts_ms)),
            escape(&e.kind),
            escape(e.detail.as_deref().unwrap_or("")),
        );
    }
    html.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u8) -> StateId {
        format!("{:064x}", u64::from(n)).parse().unwrap()
    }

    fn state(n: u8, parent: Option<u8>, created_ms: u64) -> StateInfo {
        StateInfo {
            state_id: sid(n),
            parent: parent.map(sid),
            label: format!("step {n}"),
            status: StateStatus::Warm,
            size_bytes: 1 << 20,
            build_cost_ms: 1500,
            restore_cost_ms: 20,
            created_ms,
            last_access_ms: created_ms,
            access_count: 0,
            instances: 0,
            score: 1.25,
            pin: None,
            status_reason: None,
            location: "local".into(),
            client_only: false,
        }
    }

    #[test]
    fn escape_covers_the_five_characters_html_cares_about() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert_eq!(escape("plain ünïcödé"), "plain ünïcödé");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn the_tree_puts_children_under_their_parent_in_creation_order() {
        // 1 ─┬─ 2 ── 4
        //    └─ 3
        // 5 (its parent 9 is not listed: a root)
        let states = vec![
            state(4, Some(2), 40),
            state(3, Some(1), 30),
            state(2, Some(1), 20),
            state(1, None, 10),
            state(5, Some(9), 5),
        ];
        let order: Vec<(StateId, usize)> = tree_order(&states)
            .into_iter()
            .map(|(s, d)| (s.state_id, d))
            .collect();
        assert_eq!(
            order,
            vec![
                (sid(5), 0),
                (sid(1), 0),
                (sid(2), 1),
                (sid(4), 2),
                (sid(3), 1)
            ]
        );
    }

    #[test]
    fn the_page_nests_states_and_shows_their_facts() {
        let mut hot = state(2, Some(1), 20);
        hot.status = StateStatus::Hot;
        hot.pin = Some("main".into());
        hot.location = "local+remote".into();
        let page = page(&Page {
            now_ms: 100_000,
            version: "0.1.0".into(),
            viewer: "admin (admin)".into(),
            states: vec![state(1, None, 10), hot],
            ..Default::default()
        });
        let root = page
            .find(&format!(r#"data-state-id="{}""#, sid(1)))
            .unwrap();
        let child = page
            .find(&format!(r#"data-state-id="{}""#, sid(2)))
            .unwrap();
        assert!(root < child);
        assert!(page.contains(&format!(
            r#"data-state-id="{}" data-parent="{}" data-depth="1""#,
            sid(2),
            sid(1)
        )));
        let row = &page[child..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(
            row.contains(r#"<span class="presence hot">Hot</span>"#),
            "{row}"
        );
        assert!(row.contains(&sid(2).to_string()[..12]));
        for fact in ["1.0 MiB", "1.5 s", "20 ms", "1.25", "main", "local+remote"] {
            assert!(row.contains(fact), "{fact} in {row}");
        }
        assert!(page.contains(r#"<meta http-equiv="refresh" content="10">"#));
        assert!(page.contains("<svg"));
    }

    #[test]
    fn the_page_escapes_what_it_is_given() {
        let mut s = state(1, None, 10);
        s.label = "<script>alert(1)</script>".into();
        s.status_reason = Some(r#"" onmouseover="x"#.into());
        s.pin = Some("manual:<b>".into());
        let page = page(&Page {
            now_ms: 100_000,
            version: "<v>".into(),
            viewer: "<who>".into(),
            states: vec![s],
            instances: vec![InstanceLine {
                instance_id: format!("{:016x}", 7).parse().unwrap(),
                state_id: sid(1),
                owner: "<owner>".into(),
                status: "<running>".into(),
                created_ms: 1000,
                last_activity_ms: Some(2000),
                connections: 0,
            }],
            events: vec![EventInfo {
                ts_ms: 50_000,
                kind: "<kind>".into(),
                state_id: Some(sid(1)),
                instance_id: None,
                detail: Some("a & b <i>".into()),
            }],
            ..Default::default()
        });
        for raw in [
            "<script>",
            r#"" onmouseover"#,
            "<b>",
            "<v>",
            "<who>",
            "<owner>",
            "<running>",
            "<kind>",
            "<i>",
        ] {
            assert!(!page.contains(raw), "{raw} is not escaped");
        }
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("a &amp; b &lt;i&gt;"));
    }

    #[test]
    fn instances_show_owner_age_and_idle_time() {
        let line = |n: u32, activity: Option<u64>, connections: u32| InstanceLine {
            instance_id: format!("{n:016x}").parse().unwrap(),
            state_id: sid(1),
            owner: if n == 1 {
                "alice".into()
            } else {
                String::new()
            },
            status: "running".into(),
            created_ms: 0,
            last_activity_ms: activity,
            connections,
        };
        let page = page(&Page {
            now_ms: 3_725_000,
            instances: vec![line(1, Some(3_605_000), 0), line(2, Some(0), 2)],
            ..Default::default()
        });
        let rows: Vec<&str> = page.split(r#"<tr class="instance""#).skip(1).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].contains("alice"));
        assert!(rows[0].contains("1 h 02 min"), "age: {}", rows[0]);
        assert!(rows[0].contains("2 min 00 s"), "idle: {}", rows[0]);
        assert!(rows[1].contains("in use (2 conn.)"), "{}", rows[1]);
    }

    #[test]
    fn an_empty_controller_renders() {
        let page = page(&Page::default());
        assert!(page.contains("No states yet"));
        assert!(page.contains("No instances."));
        assert!(page.contains("no samples yet"));
    }

    #[test]
    fn the_login_form_posts_a_password_field() {
        let form = login(Some("that token is not valid"));
        assert!(form.contains(r#"method="post" action="/login""#));
        assert!(form.contains(r#"name="token" type="password""#));
        assert!(form.contains("that token is not valid"));
        assert!(
            !form.contains("http-equiv=\"refresh\""),
            "a refresh would lose the typing"
        );
    }

    #[test]
    fn humane_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_ms(999), "999 ms");
        assert_eq!(human_ms(61_000), "1 min 01 s");
        assert_eq!(human_ms(90_061_000), "1 d 01 h");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
    }
}
