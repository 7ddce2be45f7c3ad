//! The pytest plugin's own tests (python/pytest-taidon/tests), run by pytest against this
//! build's `sqlrs` and `taidon`. pytest, pytest-xdist, psycopg and the plugin come from
//! scripts/setup.sh.

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn pytest_plugin_tests_pass() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root");
    let sqlrs = PathBuf::from(env!("CARGO_BIN_EXE_sqlrs"));
    // `taidon` is built beside `sqlrs` by `cargo test --workspace`.
    let taidon = sqlrs.with_file_name("taidon");
    assert!(
        taidon.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        taidon.display()
    );
    let args = [
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "python/pytest-taidon/tests",
        "-q",
    ];
    let out = Command::new("python3")
        .args(args)
        .current_dir(&repo)
        .env("SQLRS_BIN", &sqlrs)
        .env("TAIDON_BIN", &taidon)
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): run scripts/setup.sh"));
    assert!(
        out.status.success(),
        "$ SQLRS_BIN={} TAIDON_BIN={} python3 {} (in {})\nexit {:?}\n--- stdout\n{}\n--- stderr\n{}\n\
         (pytest, pytest-xdist and psycopg missing? run scripts/setup.sh)",
        sqlrs.display(),
        taidon.display(),
        args.join(" "),
        repo.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
