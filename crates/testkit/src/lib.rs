//! Helpers for Taidon's tests, never for production code (`publish = false`, a dev-dependency
//! only).
//!
//! - [`s3`]: real S3-compatible servers (moto, SeaweedFS) on loopback, on free ports, killed
//!   when dropped.
//! - [`fault`]: a FAKE — a reverse proxy that fails every Nth request with `503 Slow Down`.
//! - [`kube`]: a FAKE Kubernetes API server with a process kubelet, for the Kubernetes runtime's
//!   end-to-end tests (no real API server can run where the tests run).
//!
//! A test whose prerequisite (a server binary) is missing is skipped with a loud `SKIP` line on
//! stderr, or fails when `TAIDON_REQUIRE_COW` is set (as CI sets it): see [`prerequisite_missing`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

pub mod fault;
mod http;
pub mod kube;
pub mod s3;
mod sigv4;

use std::io::Write as _;
use std::sync::Mutex;

pub use http::HttpResponse;

/// The last 40 lines of every file under `dir` (a home's `logs`), each headed by its path: what
/// an end-to-end test prints when it fails.
pub fn log_tails(dir: &std::path::Path) -> String {
    let mut out = String::new();
    collect_logs(dir, &mut out);
    out
}

fn collect_logs(dir: &std::path::Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_logs(&p, out);
        } else if let Ok(text) = std::fs::read_to_string(&p) {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("=== {}\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
}

/// Whether a missing prerequisite must fail the test: `TAIDON_REQUIRE_COW` is set (to anything
/// but "" or "0").
pub fn prerequisites_required() -> bool {
    std::env::var_os("TAIDON_REQUIRE_COW").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Reports that `test` cannot run because `what` is missing: panics when
/// [`prerequisites_required`], otherwise prints a `SKIP` line on stderr (the caller then returns).
pub fn prerequisite_missing(test: &str, what: &str) {
    if prerequisites_required() {
        panic!("{test}: TAIDON_REQUIRE_COW is set but {what}");
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: {what}; set TAIDON_REQUIRE_COW=1 to fail instead"
    );
}

static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` with the environment variables `vars` set, under a process-wide lock, then restores
/// the previous values (also when `f` panics).
///
/// For code that reads credentials from the environment while it is set up (an S3 client built
/// `from_env`): tests in one binary run on parallel threads and share one environment, so every
/// test that sets variables this way sees only its own.
pub fn with_env<T>(vars: &[(String, String)], f: impl FnOnce() -> T) -> T {
    struct Restore(Vec<(String, Option<std::ffi::OsString>)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            for (name, old) in self.0.drain(..) {
                match old {
                    Some(value) => std::env::set_var(&name, value),
                    None => std::env::remove_var(&name),
                }
            }
        }
    }
    // A panic in another test's `f` poisons the lock but leaves the environment restored.
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let restore = Restore(
        vars.iter()
            .map(|(name, _)| (name.clone(), std::env::var_os(name)))
            .collect(),
    );
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
    let out = f();
    drop(restore);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_env_sets_and_restores() {
        let name = "TAIDON_TESTKIT_WITH_ENV_PROBE";
        std::env::remove_var(name);
        let seen = with_env(&[(name.to_owned(), "inside".to_owned())], || {
            std::env::var(name).ok()
        });
        assert_eq!(seen.as_deref(), Some("inside"));
        assert!(std::env::var_os(name).is_none());
    }
}
