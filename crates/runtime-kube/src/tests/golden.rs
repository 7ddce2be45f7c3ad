//! The runner pod specs against golden files; `UPDATE_GOLDEN=1` rewrites them.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use super::fixtures::{iid, state, SECRET};
use crate::control::pod_token;
use crate::pods::{self, Role};

/// Where golden file `name` lives.
fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}_pod.json"))
}

/// Golden file `name`, parsed.
pub(crate) fn golden(name: &str) -> Value {
    let path = golden_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; UPDATE_GOLDEN=1 cargo test -p taidon-runtime-kube writes it",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("a golden file is JSON")
}

/// The instance pod, the build pod from a parent and the initdb build pod, under fixed names
/// and tokens (derived from the fixed secret, as the runtime derives them).
pub(crate) fn golden_pods() -> Vec<(&'static str, Pod)> {
    let settings = super::fixtures::settings();
    let instance_name = pods::instance_pod_name(&iid(0x1a));
    let build_name = format!("taidon-b-{}-000001", state(0xb1).short());
    let initdb_name = format!("taidon-b-{}-000002", state(0xb2).short());
    vec![
        (
            "instance",
            pods::runner_pod(
                &settings,
                &instance_name,
                &Role::Instance {
                    iid: iid(0x1a),
                    state: state(0x5a),
                },
                &pod_token(SECRET, &instance_name),
                None,
                &Default::default(),
            ),
        ),
        (
            "build",
            pods::runner_pod(
                &settings,
                &build_name,
                &Role::Build {
                    state: state(0xb1),
                    parent: Some(state(0x5a)),
                },
                &pod_token(SECRET, &build_name),
                Some(&pod_token(SECRET, &format!("{build_name}/postgres"))),
                &Default::default(),
            ),
        ),
        (
            "initdb",
            pods::runner_pod(
                &settings,
                &initdb_name,
                &Role::Build {
                    state: state(0xb2),
                    parent: None,
                },
                &pod_token(SECRET, &initdb_name),
                None,
                // A recipe's settings travel to the initdb pod.
                &std::collections::BTreeMap::from([(
                    "max_prepared_transactions".to_owned(),
                    "10".to_owned(),
                )]),
            ),
        ),
    ]
}

/// A line diff of `want` and `got` (longest common subsequence; golden files are short).
fn line_diff(want: &str, got: &str) -> String {
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("-{:>4} {}\n", i + 1, a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+{:>4} {}\n", j + 1, b[j]));
            j += 1;
        }
    }
    out
}

#[test]
fn runner_pods_match_their_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for (name, pod) in golden_pods() {
        let got = serde_json::to_string_pretty(&pod).expect("JSON") + "\n";
        let path = golden_path(name);
        if update {
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, &got).expect("write a golden file");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if want != got {
            mismatches.push(format!(
                "{} differs (- golden, + now):\n{}",
                path.display(),
                line_diff(&want, &got)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{}\nIf the change is intended: UPDATE_GOLDEN=1 cargo test -p taidon-runtime-kube --lib golden",
        mismatches.join("\n")
    );
}

#[test]
fn golden_pods_differ_where_their_roles_do() {
    let pods = golden_pods();
    let env = |pod: &Pod, key: &str| {
        pod.spec.as_ref().expect("a spec").containers[0]
            .env
            .as_ref()
            .expect("env")
            .iter()
            .find(|e| e.name == key)
            .and_then(|e| e.value.clone())
    };
    let (instance, build, initdb) = (&pods[0].1, &pods[1].1, &pods[2].1);
    assert_eq!(
        env(instance, "TAIDON_RUNNER_SOURCE"),
        Some(state(0x5a).to_string())
    );
    assert_eq!(
        env(build, "TAIDON_RUNNER_SOURCE"),
        Some(state(0x5a).to_string())
    );
    assert_eq!(env(initdb, "TAIDON_RUNNER_SOURCE"), Some("initdb".into()));
    assert_eq!(env(initdb, "TAIDON_RUNNER_SERVE"), Some("false".into()));
    assert!(env(build, "TAIDON_SUPERUSER_PASSWORD").is_some());
    assert!(env(instance, "TAIDON_SUPERUSER_PASSWORD").is_none());
    // Every label value is a valid one (at most 63 characters), and each pod is selected by
    // the runtime's selector.
    for (name, pod) in &pods {
        let labels = pod.metadata.labels.as_ref().expect("labels");
        for (key, value) in labels {
            assert!(value.len() <= 63, "{name}: label {key}={value} is too long");
        }
        for term in pods::SELECTOR.split(',') {
            let (key, value) = term.split_once('=').expect("key=value");
            assert_eq!(labels.get(key).map(String::as_str), Some(value), "{name}");
        }
        let pod_name = pod.metadata.name.as_deref().expect("a name");
        assert!(pod_name.len() <= 63, "{pod_name} is too long");
    }
}

#[test]
fn a_diff_names_the_changed_lines() {
    let diff = line_diff("a\nb\nc\n", "a\nB\nc\n");
    assert_eq!(diff, "-   2 b\n+   2 B\n");
}
