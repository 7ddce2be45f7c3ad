//! Progress of a prepare or a warmup, from the daemon's events: one renderer for both.
//!
//! - On a terminal: a spinner per step with its elapsed time (a byte bar while bytes are
//!   copied), cut to the terminal's width by indicatif; finished steps stay as lines.
//! - Off a terminal: plain lines, one per step start and end.
//! - With `-v --json`: each event as one NDJSON line.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use taidon_api::PrepareEvent;

use crate::render::{human_size, secs2};

/// How often a spinner moves on a terminal.
const TICK: Duration = Duration::from_millis(100);

/// Where and how progress is shown.
pub(crate) enum Target {
    /// indicatif bars on this draw target (stderr, or an in-memory terminal in tests).
    Terminal {
        draw: ProgressDrawTarget,
        /// Whether a thread redraws spinners on its own (off in tests, which tick by hand).
        steady: bool,
        /// The terminal's width; `None`: ask stderr's terminal each time.
        cols: Option<u16>,
    },
    /// Plain lines.
    Lines(Box<dyn Write + Send>),
    /// NDJSON events.
    Json(Box<dyn Write + Send>),
}

impl Target {
    /// What stderr calls for: bars on a terminal, else lines; NDJSON for `-v --json`.
    pub(crate) fn stderr(json: bool, verbose: bool) -> Self {
        use std::io::IsTerminal;
        if json && verbose {
            Target::Json(Box::new(io::stderr()))
        } else if io::stderr().is_terminal() {
            Target::Terminal {
                draw: ProgressDrawTarget::stderr(),
                steady: true,
                cols: None,
            }
        } else {
            Target::Lines(Box::new(io::stderr()))
        }
    }
}

/// Counts what the lines summarise.
#[derive(Debug)]
struct Tally {
    started: Instant,
    built: usize,
    downloaded: usize,
}

/// The plain line for an event (empty when it has none at this verbosity).
fn line(event: &PrepareEvent, verbose: bool, tally: &Tally, now: Instant) -> String {
    match event {
        PrepareEvent::Plan {
            total,
            cached,
            state_id,
        } if verbose => {
            format!("sqlrs: plan: {total} steps, {cached} cached, target state {state_id}\n")
        }
        PrepareEvent::Plan { .. } => String::new(),
        PrepareEvent::Restoring {
            state_id,
            from,
            steps,
        } => {
            let from = match from {
                Some(f) => format!("its nearest surviving ancestor {}", f.short()),
                None => "initdb (no ancestor survives)".to_owned(),
            };
            format!(
                "sqlrs: state {} is COLD (evicted): restoring from {from}, replaying {steps} step{}\n",
                state_id.short(),
                plural(*steps)
            )
        }
        PrepareEvent::Initdb { state_id } => {
            format!("sqlrs: creating base state {} (initdb)\n", state_id.short())
        }
        PrepareEvent::Waiting { index, state_id } => format!(
            "sqlrs: step {index}: waiting for another prepare building state {}\n",
            state_id.short()
        ),
        PrepareEvent::StepStarted {
            index,
            total,
            label,
            state_id,
        } => {
            if verbose {
                format!("sqlrs: step {index}/{total} {label} (state {state_id})\n")
            } else {
                format!("sqlrs: step {index}/{total} {label}\n")
            }
        }
        PrepareEvent::Transfer { .. } | PrepareEvent::Heartbeat {} => String::new(),
        PrepareEvent::RunCommand {
            index,
            total,
            label,
            state_id,
            ..
        } => {
            if verbose {
                format!("sqlrs: step {index}/{total} {label}: running here (state {state_id})\n")
            } else {
                format!("sqlrs: step {index}/{total} {label}: running here\n")
            }
        }
        PrepareEvent::Downloading {
            index,
            state_id,
            from,
        } => {
            let what = if *index == 0 {
                "base state".to_owned()
            } else {
                format!("step {index}: state")
            };
            format!(
                "sqlrs: {what} {} is in {from}: downloading it\n",
                state_id.short()
            )
        }
        PrepareEvent::Downloaded {
            state_id,
            bytes,
            elapsed_ms,
            ..
        } => {
            let secs = (*elapsed_ms as f64 / 1000.0).max(0.001);
            format!(
                "sqlrs: downloaded state {}: {} in {} ({}/s)\n",
                state_id.short(),
                human_size(*bytes),
                secs2(Duration::from_millis(*elapsed_ms)),
                human_size((*bytes as f64 / secs) as u64)
            )
        }
        PrepareEvent::Notice { message } => format!("sqlrs: {message}\n"),
        PrepareEvent::StepDone {
            index,
            total,
            state_id,
            elapsed_ms,
        } => {
            let took = secs2(Duration::from_millis(*elapsed_ms));
            if verbose {
                format!(
                    "sqlrs: step {index}/{total} done in {took}: state {}\n",
                    state_id.short()
                )
            } else {
                format!("sqlrs: step {index}/{total} done in {took}\n")
            }
        }
        PrepareEvent::InstanceStarting { state_id } if verbose => format!(
            "sqlrs: starting an instance of state {}\n",
            state_id.short()
        ),
        PrepareEvent::InstanceStarting { .. } => String::new(),
        PrepareEvent::Done {
            state_id,
            cache_hit,
            instance,
        } => {
            let took = secs2(now.saturating_duration_since(tally.started));
            let how = if tally.downloaded > 0 && tally.built > 0 {
                format!(
                    "downloaded {}, built {} step{} in {took}",
                    tally.downloaded,
                    tally.built,
                    plural(tally.built)
                )
            } else if tally.downloaded > 0 {
                format!("downloaded from the bucket in {took}")
            } else if *cache_hit {
                "cached".to_owned()
            } else {
                format!(
                    "built {} step{} in {}",
                    tally.built,
                    plural(tally.built),
                    secs2(now.saturating_duration_since(tally.started))
                )
            };
            if verbose {
                let mut out = format!("sqlrs: state {state_id} ready ({how})\n");
                if let Some(i) = instance {
                    out.push_str(&format!(
                        "sqlrs: instance {} (clone {}ms, start {}ms)\n",
                        i.instance_id, i.clone_ms, i.start_ms
                    ));
                }
                out
            } else {
                format!("sqlrs: state {} ready ({how})\n", state_id.short())
            }
        }
        // The error itself is printed by the caller, like any other failure.
        PrepareEvent::Failed { .. } => String::new(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The bars on a terminal.
struct Bars {
    multi: MultiProgress,
    steady: bool,
    cols: Option<u16>,
    /// The running step's bar.
    step: Option<ProgressBar>,
    /// What runs outside a step: initdb, waiting, starting an instance.
    activity: Option<ProgressBar>,
}

fn seconds(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.1}s", state.elapsed().as_secs_f64());
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix}{wide_msg} {secs}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .with_key("secs", seconds)
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓")
}

/// A byte count against its total, with a bar where the terminal has room for one.
fn bytes_style(cols: u16) -> ProgressStyle {
    let template = if cols >= 80 {
        "{spinner} {prefix}{wide_msg} {bar:20} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {secs}"
    } else {
        "{spinner} {prefix}{wide_msg} {percent}% {secs}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("secs", seconds)
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓")
        .progress_chars("=> ")
}

/// A finished step's line: its mark, its prefix and label (cut to fit `cols`), and an ending.
fn finished_line(mark: &str, prefix: &str, label: &str, ending: &str, cols: u16) -> String {
    let fixed = console::measure_text_width(&format!("{mark} {prefix} {ending}"));
    let room = usize::from(cols).saturating_sub(fixed).max(1);
    format!("{mark} {prefix}{} {ending}", cut(label, room))
}

/// `text` if it is at most `width` columns wide, else as much of it as fits with `…`.
fn cut(text: &str, width: usize) -> String {
    if console::measure_text_width(text) <= width {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = console::measure_text_width(c.encode_utf8(&mut [0; 4]));
        if used + w + 1 > width {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

impl Bars {
    fn spinner(&self, prefix: String, message: String) -> ProgressBar {
        let bar = self.multi.add(
            ProgressBar::new_spinner()
                .with_style(spinner_style())
                .with_prefix(prefix)
                .with_message(message),
        );
        if self.steady {
            bar.enable_steady_tick(TICK);
        } else {
            bar.tick();
        }
        bar
    }

    fn end_activity(&mut self) {
        if let Some(bar) = self.activity.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }

    fn cols(&self) -> u16 {
        self.cols
            .unwrap_or_else(|| console::Term::stderr().size().1)
    }

    /// Ends `bar` with a permanent line in its place (above the bars still running).
    fn finish(&self, bar: ProgressBar, mark: &str, ending: &str) {
        let line = finished_line(mark, &bar.prefix(), &bar.message(), ending, self.cols());
        bar.finish_and_clear();
        self.multi.remove(&bar);
        let _ = self.multi.println(line);
    }

    fn println(&self, text: &str) {
        for line in text.lines() {
            let _ = self.multi.println(line);
        }
    }

    fn event(&mut self, event: &PrepareEvent, plain: &str) {
        match event {
            PrepareEvent::Plan { .. }
            | PrepareEvent::Restoring { .. }
            | PrepareEvent::Notice { .. }
            | PrepareEvent::RunCommand { .. } => self.println(plain),
            PrepareEvent::Heartbeat {} => {}
            PrepareEvent::Downloading { state_id, .. } => {
                self.end_activity();
                let bar = self.spinner(
                    String::new(),
                    format!("downloading state {}", state_id.short()),
                );
                self.activity = Some(bar);
            }
            PrepareEvent::Downloaded { .. } => {
                self.end_activity();
                self.println(plain);
            }
            PrepareEvent::Initdb { state_id } => {
                self.end_activity();
                let bar = self.spinner(
                    String::new(),
                    format!("initdb: base state {}", state_id.short()),
                );
                self.activity = Some(bar);
            }
            PrepareEvent::Waiting { index, state_id } => {
                self.end_activity();
                let bar = self.spinner(
                    format!("step {index}: "),
                    format!("waiting for another prepare of {}", state_id.short()),
                );
                self.activity = Some(bar);
            }
            PrepareEvent::StepStarted {
                index,
                total,
                label,
                ..
            } => {
                self.end_activity();
                let bar = self.spinner(format!("[{index}/{total}] "), label.clone());
                self.step = Some(bar);
            }
            PrepareEvent::Transfer {
                what,
                done_bytes,
                total_bytes,
            } => {
                let bar = match (&self.step, &self.activity) {
                    (Some(bar), _) => bar.clone(),
                    (None, Some(bar)) => bar.clone(),
                    (None, None) => {
                        let bar = self.spinner(String::new(), what.clone());
                        self.activity = Some(bar.clone());
                        bar
                    }
                };
                if bar.length() != Some(*total_bytes) {
                    bar.set_style(bytes_style(self.cols()));
                    bar.set_length(*total_bytes);
                }
                bar.set_position(*done_bytes);
                if !self.steady {
                    bar.tick();
                }
            }
            PrepareEvent::StepDone { elapsed_ms, .. } => {
                if let Some(bar) = self.step.take() {
                    let took = secs2(Duration::from_millis(*elapsed_ms));
                    self.finish(bar, "✓", &took);
                }
                self.end_activity();
            }
            PrepareEvent::InstanceStarting { .. } => {
                self.end_activity();
                let bar = self.spinner(String::new(), "starting an instance".to_owned());
                self.activity = Some(bar);
            }
            PrepareEvent::Done { .. } => {
                self.end_activity();
                self.println(plain);
            }
            PrepareEvent::Failed { .. } => self.fail(),
        }
    }

    /// The running step is marked failed; whatever else ran goes away.
    fn fail(&mut self) {
        if let Some(bar) = self.step.take() {
            let took = secs2(bar.elapsed());
            self.finish(bar, "✗", &format!("failed after {took}"));
        }
        self.end_activity();
    }
}

/// Renders the events of one prepare or warmup.
pub(crate) struct Renderer {
    verbose: bool,
    tally: Tally,
    out: Out,
}

enum Out {
    Bars(Bars),
    Lines(Box<dyn Write + Send>),
    Json(Box<dyn Write + Send>),
}

impl Renderer {
    pub(crate) fn new(target: Target, verbose: bool, now: Instant) -> Self {
        let out = match target {
            Target::Terminal { draw, steady, cols } => Out::Bars(Bars {
                multi: MultiProgress::with_draw_target(draw),
                steady,
                cols,
                step: None,
                activity: None,
            }),
            Target::Lines(w) => Out::Lines(w),
            Target::Json(w) => Out::Json(w),
        };
        Self {
            verbose,
            tally: Tally {
                started: now,
                built: 0,
                downloaded: 0,
            },
            out,
        }
    }

    /// Shows one event.
    pub(crate) fn event(&mut self, event: &PrepareEvent, now: Instant) {
        if matches!(event, PrepareEvent::Heartbeat {}) {
            return;
        }
        match event {
            PrepareEvent::StepDone { .. } => self.tally.built += 1,
            PrepareEvent::Downloaded { .. } => self.tally.downloaded += 1,
            _ => {}
        }
        match &mut self.out {
            Out::Json(w) => {
                if let Ok(text) = serde_json::to_string(event) {
                    let _ = writeln!(w, "{text}");
                    let _ = w.flush();
                }
            }
            Out::Lines(w) => {
                let text = line(event, self.verbose, &self.tally, now);
                if !text.is_empty() {
                    let _ = w.write_all(text.as_bytes());
                    let _ = w.flush();
                }
            }
            Out::Bars(bars) => {
                let text = line(event, self.verbose, &self.tally, now);
                bars.event(event, &text);
            }
        }
    }

    /// The stream broke off: live bars must not stay behind the error message.
    pub(crate) fn abort(&mut self) {
        if let Out::Bars(bars) = &mut self.out {
            bars.fail();
        }
    }
}

#[cfg(test)]
mod tests;
