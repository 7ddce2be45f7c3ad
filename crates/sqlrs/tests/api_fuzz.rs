//! Bad input at volume on the API: schemathesis (PyPI) generates requests from the controller's
//! own `GET /v1/openapi.json` against a real daemon. No answer may be a 5xx, and every answer
//! must be what the document says: a documented status, content type, headers and body schema.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::Env;

/// The checks: no server error, and the document tells the truth about every answer. Left out:
/// `positive_data_acceptance` and `negative_data_rejection`, since the document gives ids and
/// digests as plain strings where the API wants hex of a set length.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance,ignored_auth";

#[test]
fn schemathesis_finds_no_server_error() {
    match Command::new("schemathesis").arg("--version").output() {
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
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");

    let out = Command::new("schemathesis")
        .arg("run")
        .arg(format!("{api}/v1/openapi.json"))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", token.trim()),
        ])
        .args(["--checks", CHECKS])
        // Shutting the daemon down would end the run's target.
        .args(["--exclude-path", "/v1/shutdown"])
        .args(["--max-examples", "30"])
        .args(["--request-timeout", "30"])
        .args(["--workers", "1"])
        .args(["--seed", "16"])
        // A busy machine makes generation slow; that is no finding.
        .args(["--suppress-health-check", "too_slow,filter_too_much"])
        .arg("--no-color")
        .current_dir(&env.work)
        .env("PYTHONPATH", &hooks)
        .env("SCHEMATHESIS_HOOKS", "taidon_hooks")
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures (exit {:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- logs\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    // It tested every operation but the one left out, and generated a good number of requests.
    let tested = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no 'Tested:' line\n{stdout}"));
    assert!(tested >= 30, "only {tested} operations tested\n{stdout}");
    // "Test cases:" is followed by "  N generated, N passed".
    let generated = stdout
        .lines()
        .filter(|l| l.contains(" generated, "))
        .find_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no 'N generated' line\n{stdout}"));
    assert!(generated >= 1000, "only {generated} requests\n{stdout}");
    eprintln!("schemathesis: {tested} operations, {generated} requests, no failure");
    // The daemon survived it all and still works: the generated requests may have removed the
    // state (DELETE /v1/states/{id} is among them), so prepare it again and query it.
    env.ok(&["status"]);
    let r = env.ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run:psql",
        "--",
        "-Atc",
        "select count(*) from film",
    ]);
    assert_eq!(r.stdout.trim(), "0", "{}", r.describe());
}
