use std::sync::{Arc, Mutex};

use indicatif::InMemoryTerm;
use taidon_api::ApiError;
use taidon_core::StateId;

use super::*;

fn sid(b: u8) -> StateId {
    StateId::from_bytes([b; 32])
}

/// A writer the test can read back.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
    }
}

fn build_events(label: &str) -> Vec<PrepareEvent> {
    vec![
        PrepareEvent::Plan {
            total: 2,
            cached: 0,
            state_id: sid(2),
        },
        PrepareEvent::StepStarted {
            index: 1,
            total: 2,
            label: "schema.sql".into(),
            state_id: sid(1),
        },
        PrepareEvent::StepDone {
            index: 1,
            total: 2,
            state_id: sid(1),
            elapsed_ms: 1234,
        },
        PrepareEvent::StepStarted {
            index: 2,
            total: 2,
            label: label.into(),
            state_id: sid(2),
        },
        PrepareEvent::StepDone {
            index: 2,
            total: 2,
            state_id: sid(2),
            elapsed_ms: 50,
        },
        PrepareEvent::InstanceStarting { state_id: sid(2) },
        PrepareEvent::Done {
            state_id: sid(2),
            cache_hit: false,
            instance: None,
        },
    ]
}

fn lines(verbose: bool, events: &[PrepareEvent]) -> String {
    let buf = Buf::default();
    let t0 = Instant::now();
    let mut r = Renderer::new(Target::Lines(Box::new(buf.clone())), verbose, t0);
    for (i, e) in events.iter().enumerate() {
        r.event(e, t0 + Duration::from_millis(500 * i as u64));
    }
    buf.text()
}

#[test]
fn plain_progress_prints_step_lines_and_a_summary() {
    assert_eq!(
        lines(false, &build_events("seed.sql")),
        "sqlrs: step 1/2 schema.sql\n\
         sqlrs: step 1/2 done in 1.23s\n\
         sqlrs: step 2/2 seed.sql\n\
         sqlrs: step 2/2 done in 0.05s\n\
         sqlrs: state 02020202 ready (built 2 steps in 3.00s)\n"
    );
}

#[test]
fn plain_progress_of_a_cache_hit_is_one_line() {
    let events = [
        PrepareEvent::Plan {
            total: 2,
            cached: 2,
            state_id: sid(2),
        },
        PrepareEvent::Done {
            state_id: sid(2),
            cache_hit: true,
            instance: None,
        },
    ];
    assert_eq!(
        lines(false, &events),
        "sqlrs: state 02020202 ready (cached)\n"
    );
}

#[test]
fn verbose_progress_adds_state_ids() {
    let out = lines(true, &build_events("seed.sql"));
    assert!(out.starts_with(&format!(
        "sqlrs: plan: 2 steps, 0 cached, target state {}\n",
        sid(2)
    )));
    assert!(out.contains(&format!("sqlrs: step 1/2 schema.sql (state {})\n", sid(1))));
    assert!(out.contains("sqlrs: step 1/2 done in 1.23s: state 01010101\n"));
    assert!(out.contains("sqlrs: starting an instance of state 02020202\n"));
    assert!(out.ends_with(&format!(
        "sqlrs: state {} ready (built 2 steps in 3.00s)\n",
        sid(2)
    )));
}

#[test]
fn restoring_is_said_at_every_verbosity() {
    let e = PrepareEvent::Restoring {
        state_id: sid(3),
        from: Some(sid(1)),
        steps: 2,
    };
    let want = "sqlrs: state 03030303 is COLD (evicted): restoring from its nearest surviving \
                ancestor 01010101, replaying 2 steps\n";
    assert_eq!(lines(false, std::slice::from_ref(&e)), want);
    assert_eq!(lines(true, &[e]), want);
}

#[test]
fn json_progress_is_one_event_per_line() {
    let buf = Buf::default();
    let t0 = Instant::now();
    let mut r = Renderer::new(Target::Json(Box::new(buf.clone())), true, t0);
    let events = build_events("seed.sql");
    for e in &events {
        r.event(e, t0);
    }
    let text = buf.text();
    let parsed: Vec<PrepareEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(parsed, events);
    assert!(text
        .lines()
        .next()
        .expect("a line")
        .starts_with(r#"{"event":"plan""#));
}

fn terminal(cols: u16) -> (InMemoryTerm, Renderer) {
    let term = InMemoryTerm::new(20, cols);
    let target = Target::Terminal {
        draw: ProgressDrawTarget::term_like(Box::new(term.clone())),
        steady: false,
        cols: Some(cols),
    };
    (term, Renderer::new(target, false, Instant::now()))
}

/// The screen's lines with runs of blanks squashed and the spinner's frame shown as `*`.
fn screen(term: &InMemoryTerm) -> Vec<String> {
    term.contents()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|w| {
                    if "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏".contains(w) {
                        "*"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Every screen line fits `cols` and holds no escape sequence that was not interpreted.
fn assert_clean(term: &InMemoryTerm, cols: u16) {
    let contents = term.contents();
    for line in contents.lines() {
        assert!(
            line.chars().count() <= usize::from(cols),
            "line wider than {cols}: {line:?}"
        );
        assert!(!line.contains('\x1b'), "stray escape in {line:?}");
    }
}

#[test]
fn a_long_label_is_cut_to_the_terminal_width_and_leaves_nothing_behind() {
    let cols = 40;
    let long = format!(
        "migrations/{}/V42__a_very_long_name.sql",
        "deep/".repeat(20)
    );
    let (term, mut r) = terminal(cols);
    let events = build_events(&long);
    let t0 = Instant::now();
    r.event(&events[0], t0);
    r.event(&events[1], t0);
    assert_eq!(screen(&term), ["* [1/2] schema.sql 0.0s"]);
    r.event(&events[2], t0);
    r.event(&events[3], t0);
    assert_clean(&term, cols);
    let contents = term.contents();
    let second = contents.lines().nth(1).expect("the second step's line");
    assert_eq!(second.chars().count(), usize::from(cols), "{second:?}");
    assert_eq!(
        screen(&term),
        [
            "✓ [1/2] schema.sql 1.23s",
            "* [2/2] migrations/deep/deep/deep/d 0.0s"
        ]
    );
    // Bytes of a copy turn the spinner into a byte bar, still within the width.
    r.event(
        &PrepareEvent::Transfer {
            what: "copying snapshot".into(),
            done_bytes: 512 << 10,
            total_bytes: 1 << 20,
        },
        t0,
    );
    assert_clean(&term, cols);
    let copying = screen(&term);
    assert!(copying[1].starts_with("* [2/2] "), "{copying:?}");
    assert!(copying[1].ends_with(" 50% 0.0s"), "{copying:?}");
    for e in &events[4..] {
        r.event(e, t0);
    }
    assert_clean(&term, cols);
    let done = screen(&term);
    assert_eq!(done.len(), 4, "{done:?}");
    assert_eq!(done[0], "✓ [1/2] schema.sql 1.23s");
    assert_eq!(done[1], "✓ [2/2] migrations/deep/deep/deep… 0.05s");
    assert_eq!(done[1].chars().count(), usize::from(cols));
    // A summary wider than the terminal wraps: it is never redrawn.
    assert_eq!(done[2], "sqlrs: state 02020202 ready (built 2 ste");
}

#[test]
fn a_wider_terminal_shows_the_whole_label() {
    let (term, mut r) = terminal(120);
    let t0 = Instant::now();
    for e in &build_events("seed.sql")[..4] {
        r.event(e, t0);
    }
    assert_eq!(
        screen(&term),
        ["✓ [1/2] schema.sql 1.23s", "* [2/2] seed.sql 0.0s"]
    );
    let contents = term.contents();
    let second = contents.lines().nth(1).expect("line");
    assert!(
        second.ends_with(" 0.0s"),
        "the time is at the right edge: {second:?}"
    );
}

#[test]
fn a_wide_terminal_shows_a_byte_bar() {
    let (term, mut r) = terminal(100);
    let t0 = Instant::now();
    r.event(&build_events("seed.sql")[1], t0);
    r.event(
        &PrepareEvent::Transfer {
            what: "copying snapshot".into(),
            done_bytes: 512 << 10,
            total_bytes: 1 << 20,
        },
        t0,
    );
    assert_clean(&term, 100);
    // The rate between the bytes and the time depends on the clock: only its shape is fixed.
    let lines = screen(&term);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let (left, right) = lines[0]
        .split_once(" 512.00 KiB/1.00 MiB ")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(left, "* [1/2] schema.sql ==========>");
    let (rate, secs) = right
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(rate.ends_with("/s"), "no rate in {lines:?}");
    assert_eq!(secs, "0.0s");
}

#[test]
fn a_failure_marks_the_step_and_clears_what_else_ran() {
    let (term, mut r) = terminal(60);
    let t0 = Instant::now();
    let events = build_events("seed.sql");
    for e in &events[..4] {
        r.event(e, t0);
    }
    r.event(
        &PrepareEvent::Failed {
            error: ApiError::new(taidon_api::ErrorKind::StepFailed, "x"),
        },
        t0,
    );
    assert_clean(&term, 60);
    let lines = screen(&term);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], "✓ [1/2] schema.sql 1.23s");
    assert!(
        lines[1].starts_with("✗ [2/2] seed.sql failed after 0.0"),
        "{lines:?}"
    );
}

#[test]
fn activities_outside_steps_come_and_go() {
    let (term, mut r) = terminal(60);
    let t0 = Instant::now();
    r.event(&PrepareEvent::Initdb { state_id: sid(9) }, t0);
    assert_eq!(screen(&term), ["* initdb: base state 09090909 0.0s"]);
    r.event(&PrepareEvent::InstanceStarting { state_id: sid(9) }, t0);
    assert_eq!(screen(&term), ["* starting an instance 0.0s"]);
    r.event(
        &PrepareEvent::Done {
            state_id: sid(9),
            cache_hit: true,
            instance: None,
        },
        t0,
    );
    assert_eq!(screen(&term), ["sqlrs: state 09090909 ready (cached)"]);
}
