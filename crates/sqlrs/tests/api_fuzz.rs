//! Bad input at volume on the API: schemathesis (PyPI) generates requests from the controller's
//! own `GET /v1/openapi.json` against a real daemon, and no answer may be a 5xx.

mod common;

use std::fs;
use std::process::Command;

use common::Env;

/// Seconds schemathesis may spend in all (its fuzzing phase repeats until then).
const BUDGET_S: &str = "90";

#[test]
fn schemathesis_finds_no_server_error() {
    let version = Command::new("schemathesis").arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {}
        _ => panic!("schemathesis is missing: run scripts/setup.sh"),
    }
    let env = Env::new();
    // A state and an instance, so that ids and prefixes the generator tries can exist.
    env.write(
        "schema.sql",
        "create table film (id int primary key, title text);\n",
    );
    env.ok(&["prepare:psql", "--", "-f", "schema.sql"]);
    let info: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(env.home.join("daemon.json")).expect("daemon.json"),
    )
    .expect("daemon.json is JSON");
    let api = info["api_url"].as_str().expect("api_url").to_owned();
    let token = fs::read_to_string(env.home.join("api.token")).expect("api.token");

    let out = Command::new("schemathesis")
        .arg("run")
        .arg(format!("{api}/v1/openapi.json"))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", token.trim()),
        ])
        .args(["--checks", "not_a_server_error"])
        // Shutting the daemon down would end the run's target.
        .args(["--exclude-path", "/v1/shutdown"])
        .args(["--max-time", BUDGET_S])
        .args(["--max-examples", "30"])
        .args(["--request-timeout", "30"])
        .args(["--workers", "1"])
        .args(["--seed", "16"])
        .current_dir(&env.work)
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    assert!(
        out.status.success(),
        "schemathesis found server errors (exit {:?})\n--- stdout\n{}\n--- stderr\n{}\n--- logs\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    // The daemon survived it all.
    env.ok(&["status"]);
}
