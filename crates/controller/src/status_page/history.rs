//! The last hour of store usage and running instances, sampled in the background, and the
//! chart the status page draws from it.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use super::render::{escape, human_bytes};
use crate::lock;

/// How often the sampler records a point.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// How far back the history (and the chart) reaches.
pub(crate) const WINDOW_MS: u64 = 3600 * 1000;
/// An hour of samples, and a few more for a late tick.
const CAPACITY: usize = (WINDOW_MS / 15_000) as usize + 8;

/// One point of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) at_ms: u64,
    pub(crate) store_bytes: u64,
    pub(crate) instances: u64,
}

/// A ring buffer of the samples of the last hour.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Records `sample`, dropping those older than an hour before it (and the oldest when
    /// full).
    pub(crate) fn record(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        let oldest = sample.at_ms.saturating_sub(WINDOW_MS);
        while samples.front().is_some_and(|s| s.at_ms < oldest) {
            samples.pop_front();
        }
        while samples.len() >= CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples, oldest first.
    pub(crate) fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).iter().copied().collect()
    }
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 60.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 36.0;

/// Store bytes (left axis) and running instances (right axis) over the hour before `now_ms`,
/// as inline SVG.
pub(crate) fn chart_svg(samples: &[Sample], now_ms: u64) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let start = now_ms.saturating_sub(WINDOW_MS);
    let shown: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_ms >= start && s.at_ms <= now_ms)
        .collect();
    // An empty store draws on a 1 MiB scale rather than a 1 B one.
    let max_bytes = shown
        .iter()
        .map(|s| s.store_bytes)
        .max()
        .unwrap_or(0)
        .max(1 << 20);
    let max_instances = shown.iter().map(|s| s.instances).max().unwrap_or(0).max(1);
    let x = |at: u64| LEFT + plot_w * (at.saturating_sub(start)) as f64 / WINDOW_MS as f64;
    let y = |v: u64, max: u64| TOP + plot_h - plot_h * v as f64 / max as f64;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg id="usage-chart" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" style="max-width:{}px" role="img" aria-label="store usage and running instances over the last hour" data-samples="{}">"##,
        WIDTH * 1.5,
        shown.len()
    );
    // Axes, grid, and their labels.
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4u64 {
        let at = start + WINDOW_MS * i / 4;
        let gx = x(at);
        let label = if i == 4 {
            "now".to_owned()
        } else {
            format!("-{} min", 60 - 15 * i)
        };
        let _ = write!(
            svg,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" class="axis">{label}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" class="axis bytes">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end" class="axis bytes">0 B</text>"##,
        LEFT - 6.0,
        TOP + 10.0,
        escape(&human_bytes(max_bytes)),
        LEFT - 6.0,
        TOP + plot_h
    );
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" class="axis instances">{max_instances}</text><text x="{:.1}" y="{:.1}" class="axis instances">0</text>"##,
        LEFT + plot_w + 6.0,
        TOP + 10.0,
        LEFT + plot_w + 6.0,
        TOP + plot_h
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="{:.1}" class="legend bytes">— store usage (left)</text><text x="{:.1}" y="{:.1}" text-anchor="end" class="legend instances">— running instances (right)</text>"##,
        HEIGHT - 4.0,
        LEFT + plot_w,
        HEIGHT - 4.0
    );
    if shown.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="empty">no samples yet</text>"##,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    } else {
        let line = |value: &dyn Fn(&Sample) -> (f64, f64)| {
            shown
                .iter()
                .map(|s| {
                    let (px, py) = value(s);
                    format!("{px:.1},{py:.1}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let bytes = line(&|s| (x(s.at_ms), y(s.store_bytes, max_bytes)));
        let instances = line(&|s| (x(s.at_ms), y(s.instances, max_instances)));
        let _ = write!(
            svg,
            r##"<polyline class="series bytes" points="{bytes}" fill="none" stroke="#1f6feb" stroke-width="2"/><polyline class="series instances" points="{instances}" fill="none" stroke="#d97706" stroke-width="2"/>"##
        );
        // One point draws no line: mark it.
        if let [only] = shown.as_slice() {
            let _ = write!(
                svg,
                r##"<circle class="bytes" cx="{:.1}" cy="{:.1}" r="3" fill="#1f6feb"/><circle class="instances" cx="{:.1}" cy="{:.1}" r="3" fill="#d97706"/>"##,
                x(only.at_ms),
                y(only.store_bytes, max_bytes),
                x(only.at_ms),
                y(only.instances, max_instances)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, store_bytes: u64, instances: u64) -> Sample {
        Sample {
            at_ms,
            store_bytes,
            instances,
        }
    }

    #[test]
    fn the_history_keeps_one_hour() {
        let h = History::default();
        for i in 0..400u64 {
            h.record(sample(i * 15_000, i, 0));
        }
        let kept = h.samples();
        let newest = 399 * 15_000;
        assert_eq!(kept.last().unwrap().at_ms, newest);
        assert!(kept.iter().all(|s| s.at_ms >= newest - WINDOW_MS));
        assert_eq!(
            kept.len(),
            241,
            "an hour of 15 s samples, both ends included"
        );
    }

    #[test]
    fn the_history_is_bounded_even_when_samples_come_fast() {
        let h = History::default();
        for i in 0..10_000u64 {
            h.record(sample(1_000_000 + i, i, 0));
        }
        assert_eq!(h.samples().len(), CAPACITY);
    }

    #[test]
    fn a_chart_without_samples_says_so() {
        let svg = chart_svg(&[], 10 * WINDOW_MS);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("no samples yet"));
        assert!(!svg.contains("<polyline"));
        assert!(svg.contains(r#"data-samples="0""#));
    }

    #[test]
    fn a_chart_of_one_sample_marks_its_point() {
        let now = 10 * WINDOW_MS;
        let svg = chart_svg(&[sample(now, 2 << 20, 1)], now);
        assert!(!svg.contains("no samples yet"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("2.0 MiB"), "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn a_chart_of_many_samples_draws_two_lines_within_the_plot() {
        let now = 10 * WINDOW_MS;
        let samples: Vec<Sample> = (0..240u64)
            .map(|i| sample(now - WINDOW_MS + i * 15_000, i * 1_000_000, i % 5))
            .chain([sample(now - 2 * WINDOW_MS, 7, 7)]) // too old: not drawn
            .collect();
        let svg = chart_svg(&samples, now);
        assert!(svg.contains(r#"data-samples="240""#));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 0);
        for points in svg.split(r#"points=""#).skip(1) {
            let points = points.split('"').next().unwrap();
            assert_eq!(points.split(' ').count(), 240);
            for p in points.split(' ') {
                let (px, py) = p.split_once(',').unwrap();
                let (px, py): (f64, f64) = (px.parse().unwrap(), py.parse().unwrap());
                assert!((LEFT..=WIDTH - RIGHT).contains(&px), "{p}");
                assert!((TOP..=HEIGHT - BOTTOM).contains(&py), "{p}");
            }
        }
        assert!(svg.contains("-60 min") && svg.contains("now"));
        assert!(
            svg.contains(">4<"),
            "the instances axis tops at the most seen"
        );
    }
}
