//! The status page end to end: a real `taidon local` daemon with a prepared state, the page
//! and its login over HTTP, then headless Chromium (tests/browser/status_page.js) signing in,
//! finding the state and its presence, and saving a screenshot.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::Env;

/// The API's URL and admin token of the daemon running in `env`'s home.
fn api(env: &Env) -> (String, String) {
    let info: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(env.home.join("daemon.json")).expect("daemon.json"),
    )
    .expect("daemon.json is JSON");
    let token = fs::read_to_string(env.home.join("api.token")).expect("api.token");
    (
        info["api_url"].as_str().expect("api_url").to_owned(),
        token.trim().to_owned(),
    )
}

/// `curl URL ARGS`: (HTTP status, response headers, body).
fn curl(url: &str, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-D", "/dev/stderr", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').expect("curl's status line");
    (
        code.trim().parse().expect("an HTTP status"),
        String::from_utf8_lossy(&out.stderr).to_lowercase(),
        body.to_owned(),
    )
}

/// The browser test's directory, with what it needs installed.
fn browser_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/setup.sh"
    );
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "{}/node_modules/playwright-core is missing: run scripts/setup.sh",
        dir.display()
    );
    dir
}

#[test]
fn the_status_page_signs_in_and_shows_a_prepared_state_in_chromium() {
    let browser = browser_dir();
    let env = Env::new();
    env.write(
        "schema.sql",
        "create table t (id int primary key);\ninsert into t values (1);\n",
    );
    env.ok(&["prepare:psql", "--", "-f", "schema.sql"]);
    let states = env.ls()["states"].as_array().expect("states[]").clone();
    let state = states
        .iter()
        .find(|s| s["parent"].is_string())
        .unwrap_or_else(|| panic!("no prepared state in {states:?}"));
    let state_id = state["state_id"].as_str().expect("state_id").to_owned();
    // The instance prepare left runs: the state is HOT, shown as "Hot".
    let presence = match state["status"].as_str().expect("status") {
        "HOT" => "Hot",
        "WARM" => "Warm",
        "COLD" => "Cold",
        other => panic!("state {state_id} is {other}"),
    };
    let (url, token) = api(&env);
    let page = format!("{url}/");

    // Without a cookie: the form, and nothing of the states.
    let (code, _, body) = curl(&page, &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#"action="/login""#) && body.contains(r#"type="password""#),
        "{body}"
    );
    assert!(!body.contains(&state_id[..12]), "state data before login");

    // A wrong token: 401, the form again, no cookie, the token not echoed.
    let wrong = "0123456789abcdef-wrong";
    let (code, headers, body) = curl(
        &format!("{url}/login"),
        &["--data-urlencode", &format!("token={wrong}")],
    );
    assert_eq!(code, 401, "{headers}\n{body}");
    assert!(!headers.contains("set-cookie"), "{headers}");
    assert!(body.contains("that token is not valid"), "{body}");
    assert!(!body.contains(wrong));

    // The real token, in a real browser.
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("status_page")
        .join("status_page.png");
    let _ = fs::remove_file(&screenshot);
    let out = Command::new("node")
        .current_dir(&browser)
        .arg("status_page.js")
        .arg(&page)
        .arg(&token)
        .arg(&state_id)
        .arg(presence)
        .arg(&screenshot)
        .output()
        .expect("node runs (scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser test failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n{}",
        env.logs()
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the browser test printed no JSON ({e}): {stdout}"));
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["state_id"], state_id.as_str());
    assert_eq!(result["presence"], presence);
    assert_eq!(result["cookie"]["http_only"], true, "{result}");
    assert!(
        !stdout.contains(&token),
        "the token is in the browser test's output"
    );

    let png = fs::read(&screenshot)
        .unwrap_or_else(|e| panic!("screenshot {}: {e}", screenshot.display()));
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG ({} bytes)",
        screenshot.display(),
        png.len()
    );

    // The daemon never logs the token.
    let logs = log_files(&env.home.join("logs"));
    assert!(!logs.is_empty(), "no logs under {}", env.home.display());
    for log in logs {
        let text = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
        assert!(!text.contains(&token), "the token is in {}", log.display());
    }
}

/// Every file under `dir`.
fn log_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(log_files(&p));
        } else {
            files.push(p);
        }
    }
    files
}
