//! The manifests in `deploy/kubernetes`: the default and every overlay render with
//! `kubectl kustomize`, pass `kubernetes-validate --strict`, and hold what the code relies on
//! (the Role is exactly `rbac::PERMISSIONS`, one controller on a volume, runner pods reachable
//! only from the gateway and the controller, bounded non-root containers).
//!
//! Needs `kubectl`, `kubernetes-validate` (PyPI) and `python3` with PyYAML; a missing tool
//! fails the test (`scripts/setup.sh` installs them).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;
use taidon_runtime_kube::rbac::PERMISSIONS;

/// The schemas the manifests are checked against (kubernetes-validate ships 1.25 to 1.37).
const KUBERNETES_VERSION: &str = "1.33.0";

const RUNNER: &str = "taidon-runner";
const GATEWAY: &str = "taidon-gateway";
const CONTROLLER: &str = "taidon-controller";
const NAME_LABEL: &str = "app.kubernetes.io/name";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One rendered kustomization: its directory (relative to the repository) and its objects.
struct Rendering {
    dir: String,
    objects: Vec<Value>,
}

/// `deploy/kubernetes` and each `deploy/kubernetes/overlays/*`, rendered and validated once.
fn renderings() -> &'static [Rendering] {
    static RENDERINGS: OnceLock<Vec<Rendering>> = OnceLock::new();
    RENDERINGS.get_or_init(|| {
        let mut dirs = vec!["deploy/kubernetes".to_owned()];
        let overlays = repo_root().join("deploy/kubernetes/overlays");
        if let Ok(entries) = std::fs::read_dir(&overlays) {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("kustomization.yaml").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            dirs.extend(
                names
                    .into_iter()
                    .map(|n| format!("deploy/kubernetes/overlays/{n}")),
            );
        }
        dirs.into_iter()
            .map(|dir| {
                let yaml = render(&dir);
                validate(&dir, &yaml);
                let objects = to_json(&dir, &yaml);
                Rendering { dir, objects }
            })
            .collect()
    })
}

/// Runs a tool; a missing one fails the test with how to install it.
fn run(mut cmd: Command, stdin: Option<&str>, install_hint: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed, and this test needs it: {install_hint}")
        }
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to {cmd:?}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {cmd:?}: {e}"))
}

fn render(dir: &str) -> String {
    let mut cmd = Command::new("kubectl");
    cmd.arg("kustomize").arg(repo_root().join(dir));
    let out = run(
        cmd,
        None,
        "see https://kubernetes.io/docs/tasks/tools/ (or run scripts/setup.sh)",
    );
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl kustomize prints UTF-8")
}

fn validate(dir: &str, yaml: &str) {
    let file = std::env::temp_dir().join(format!(
        "taidon-manifests-{}-{}.yaml",
        std::process::id(),
        dir.replace('/', "_")
    ));
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("cannot write {file:?}: {e}"));
    let mut cmd = Command::new("kubernetes-validate");
    cmd.args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file);
    let out = run(
        cmd,
        None,
        "python3 -m pip install kubernetes-validate (add --break-system-packages on a \
         system Python), or run scripts/setup.sh",
    );
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict --kubernetes-version {KUBERNETES_VERSION} rejects the \
         rendering of {dir} ({}):\n{}{}\n--- rendered YAML ---\n{yaml}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

fn to_json(dir: &str, yaml: &str) -> Vec<Value> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import sys, yaml, json; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
    ]);
    let out = run(cmd, Some(yaml), "install Python 3 with PyYAML");
    assert!(
        out.status.success(),
        "cannot convert the rendering of {dir} to JSON:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("python3 prints JSON");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = of_kind(objects, kind)
        .into_iter()
        .filter(|o| o["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {found:?}"
    );
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn has_wildcard(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('*'),
        Value::Array(a) => a.iter().any(has_wildcard),
        Value::Object(o) => o.values().any(has_wildcard),
        _ => false,
    }
}

/// The pod templates of every workload: (workload, pod spec).
fn pod_specs(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter(|o| {
            ["Deployment", "StatefulSet", "DaemonSet", "Job"]
                .contains(&o["kind"].as_str().unwrap_or(""))
        })
        .map(|o| {
            let name = format!("{} {}", o["kind"], o["metadata"]["name"]);
            (name, &o["spec"]["template"]["spec"])
        })
        .collect()
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod[*k].as_array())
        .flatten()
        .collect()
}

#[test]
fn every_kustomization_renders_and_validates() {
    let dirs: Vec<&str> = renderings().iter().map(|r| r.dir.as_str()).collect();
    assert!(
        dirs.contains(&"deploy/kubernetes/overlays/kind"),
        "the kind overlay is rendered too: {dirs:?}"
    );
    for r in renderings() {
        assert!(
            of_kind(&r.objects, "Deployment").len() >= 2,
            "{}: {:?}",
            r.dir,
            r.objects
        );
        for o in &r.objects {
            if o["kind"] != "Namespace" {
                assert_eq!(o["metadata"]["namespace"], "taidon", "{}: {o}", r.dir);
            }
        }
    }
}

#[test]
fn the_role_grants_exactly_the_permissions_the_code_uses() {
    let want: BTreeSet<(String, String, BTreeSet<String>)> = PERMISSIONS
        .iter()
        .map(|p| {
            (
                p.group.to_owned(),
                p.resource.to_owned(),
                p.verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect();
    for r in renderings() {
        for kind in ["ClusterRole", "ClusterRoleBinding"] {
            assert!(of_kind(&r.objects, kind).is_empty(), "{}: no {kind}", r.dir);
        }
        let roles = of_kind(&r.objects, "Role");
        assert_eq!(roles.len(), 1, "{}: one Role", r.dir);
        let role = named(&r.objects, "Role", CONTROLLER);
        assert!(!has_wildcard(role), "{}: a wildcard in {role}", r.dir);
        let rules = role["rules"].as_array().expect("rules");
        let mut got = BTreeSet::new();
        for rule in rules {
            let groups = strings(&rule["apiGroups"]);
            let resources = strings(&rule["resources"]);
            assert!(
                rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
                "{}: {rule}",
                r.dir
            );
            let verbs: BTreeSet<String> = strings(&rule["verbs"])
                .into_iter()
                .map(str::to_owned)
                .collect();
            for g in &groups {
                for res in &resources {
                    let entry = ((*g).to_owned(), (*res).to_owned(), verbs.clone());
                    assert!(got.insert(entry), "{}: {g}/{res} twice", r.dir);
                }
            }
        }
        assert_eq!(
            got, want,
            "{}: the Role differs from rbac::PERMISSIONS",
            r.dir
        );

        let binding = named(&r.objects, "RoleBinding", CONTROLLER);
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["roleRef"]["name"], CONTROLLER);
        let subjects = binding["subjects"].as_array().expect("subjects");
        assert_eq!(subjects.len(), 1, "{}: {binding}", r.dir);
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], CONTROLLER);
        named(&r.objects, "ServiceAccount", CONTROLLER);
        let controller = named(&r.objects, "Deployment", CONTROLLER);
        assert_eq!(
            controller["spec"]["template"]["spec"]["serviceAccountName"],
            CONTROLLER
        );
    }
}

#[test]
fn the_controller_is_one_recreated_pod_on_a_volume() {
    for r in renderings() {
        let d = named(&r.objects, "Deployment", CONTROLLER);
        assert_eq!(d["spec"]["replicas"], 1, "{}", r.dir);
        assert_eq!(d["spec"]["strategy"]["type"], "Recreate", "{}", r.dir);
        let pod = &d["spec"]["template"]["spec"];
        let claims: Vec<(&str, &str)> = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| {
                Some((
                    v["name"].as_str()?,
                    v["persistentVolumeClaim"]["claimName"].as_str()?,
                ))
            })
            .collect();
        assert_eq!(claims.len(), 1, "{}: one PVC volume: {pod}", r.dir);
        let (volume, claim) = claims[0];
        let pvc = named(&r.objects, "PersistentVolumeClaim", claim);
        assert_eq!(strings(&pvc["spec"]["accessModes"]), ["ReadWriteOnce"]);
        let main = &pod["containers"][0];
        let home = main["args"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .position(|x| x == "--home")
                    .and_then(|i| a.get(i + 1))
            })
            .and_then(Value::as_str)
            .expect("--home");
        assert!(
            main["volumeMounts"]
                .as_array()
                .expect("volumeMounts")
                .iter()
                .any(|m| m["name"] == volume
                    && m["mountPath"] == home
                    && m.get("subPath").is_none()),
            "{}: the PVC is mounted at --home {home}: {main}",
            r.dir
        );
    }
}

#[test]
fn only_the_gateway_autoscales() {
    for r in renderings() {
        let hpas = of_kind(&r.objects, "HorizontalPodAutoscaler");
        assert_eq!(hpas.len(), 1, "{}: {hpas:?}", r.dir);
        let hpa = hpas[0];
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], GATEWAY);
        assert_eq!(hpa["spec"]["minReplicas"], 2);
        assert_eq!(hpa["spec"]["maxReplicas"], 10);
        // CPU utilisation is measured against the request.
        let gateway = named(&r.objects, "Deployment", GATEWAY);
        for c in containers(&gateway["spec"]["template"]["spec"]) {
            assert!(
                c["resources"]["requests"]["cpu"].is_string(),
                "{}: {c}",
                r.dir
            );
        }
    }
}

/// The values of `app.kubernetes.io/name` a pod selector admits; `None` if it admits more
/// than a fixed set (no selector, other keys, other operators).
fn selected_names(selector: &Value) -> Option<BTreeSet<String>> {
    let obj = selector.as_object()?;
    let mut names: Option<BTreeSet<String>> = None;
    let mut narrow = |set: BTreeSet<String>| {
        names = Some(match names.take() {
            Some(prev) => prev.intersection(&set).cloned().collect(),
            None => set,
        });
    };
    for (k, v) in obj
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if k == NAME_LABEL {
            narrow(BTreeSet::from([v.as_str()?.to_owned()]));
        }
    }
    for e in obj
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if e["key"] == NAME_LABEL && e["operator"] == "In" {
            narrow(
                strings(&e["values"])
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            );
        }
    }
    names
}

#[test]
fn runner_pods_admit_only_the_gateway_and_the_controller() {
    let allowed = BTreeSet::from([GATEWAY.to_owned(), CONTROLLER.to_owned()]);
    for r in renderings() {
        let np = named(&r.objects, "NetworkPolicy", RUNNER);
        assert_eq!(
            np["spec"]["podSelector"]["matchLabels"][NAME_LABEL], RUNNER,
            "{}",
            r.dir
        );
        let types = strings(&np["spec"]["policyTypes"]);
        assert!(
            types.contains(&"Ingress") && types.contains(&"Egress"),
            "{}: {types:?}",
            r.dir
        );
        let ingress = np["spec"]["ingress"].as_array().expect("ingress rules");
        assert!(!ingress.is_empty());
        let mut admitted = BTreeSet::new();
        for rule in ingress {
            // A rule without `from` admits everyone.
            let peers = rule["from"]
                .as_array()
                .expect("every ingress rule has `from`");
            assert!(!peers.is_empty(), "{}: {rule}", r.dir);
            for peer in peers {
                let keys: Vec<&String> = peer.as_object().expect("peer").keys().collect();
                assert_eq!(
                    keys,
                    ["podSelector"],
                    "{}: only pods of this namespace, by label: {peer}",
                    r.dir
                );
                let names = selected_names(&peer["podSelector"])
                    .unwrap_or_else(|| panic!("{}: an open selector: {peer}", r.dir));
                assert!(names.is_subset(&allowed), "{}: {names:?}", r.dir);
                admitted.extend(names);
            }
            let ports: BTreeSet<i64> = rule["ports"]
                .as_array()
                .expect("ingress ports")
                .iter()
                .filter_map(|p| p["port"].as_i64())
                .collect();
            assert_eq!(ports, BTreeSet::from([5432, 7432]), "{}", r.dir);
        }
        assert_eq!(admitted, allowed, "{}", r.dir);
        // ... and the gateway and controller pods do carry the labels the policy admits.
        for name in [GATEWAY, CONTROLLER] {
            let d = named(&r.objects, "Deployment", name);
            assert_eq!(
                d["spec"]["template"]["metadata"]["labels"][NAME_LABEL], name,
                "{}",
                r.dir
            );
        }
    }
}

#[test]
fn every_container_is_bounded_and_non_root() {
    for r in renderings() {
        let pods = pod_specs(&r.objects);
        assert!(!pods.is_empty());
        for (workload, pod) in pods {
            let pod_sc = &pod["securityContext"];
            for c in containers(pod) {
                let what = format!("{}: {workload} container {}", r.dir, c["name"]);
                for side in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            !c["resources"][side][resource].is_null(),
                            "{what}: no {side}.{resource}"
                        );
                    }
                }
                let sc = &c["securityContext"];
                let effective = |key: &str| {
                    if sc[key].is_null() {
                        pod_sc[key].clone()
                    } else {
                        sc[key].clone()
                    }
                };
                assert_eq!(effective("runAsNonRoot"), true, "{what}");
                assert_ne!(effective("runAsUser"), 0, "{what}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
                assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{what}");
                assert!(sc["privileged"] != true, "{what}");
            }
        }
    }
}

fn image_tag(image: &str) -> &str {
    image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest")
}

#[test]
fn the_controller_starts_runners_of_its_own_version() {
    // `images:` retags containers but not the controller's --runner-image argument; an
    // overlay that forgets to patch it would start runners of another version.
    for r in renderings() {
        let d = named(&r.objects, "Deployment", CONTROLLER);
        let main = &d["spec"]["template"]["spec"]["containers"][0];
        let args = strings(&main["args"]);
        let runner = args
            .iter()
            .position(|a| *a == "--runner-image")
            .and_then(|i| args.get(i + 1))
            .expect("--runner-image");
        let own = image_tag(main["image"].as_str().expect("image"));
        assert!(
            runner.contains("/runner:") && image_tag(runner).starts_with(&format!("{own}-pg")),
            "{}: the controller runs {own} but starts runners of {runner}",
            r.dir
        );
    }
}

/// The controller and the gateway serve /metrics on the port their pod's Prometheus
/// annotations name, declared as the container's `metrics` port.
#[test]
fn metrics_are_served_where_the_annotations_say() {
    for r in renderings() {
        for name in ["taidon-controller", "taidon-gateway"] {
            let deploy = named(&r.objects, "Deployment", name);
            let template = &deploy["spec"]["template"];
            let annotations = &template["metadata"]["annotations"];
            assert_eq!(
                annotations["prometheus.io/scrape"], "true",
                "{}: {name}",
                r.dir
            );
            assert_eq!(
                annotations["prometheus.io/path"], "/metrics",
                "{}: {name}",
                r.dir
            );
            let port = annotations["prometheus.io/port"]
                .as_str()
                .expect("prometheus.io/port");
            let main = &template["spec"]["containers"][0];
            let args = strings(&main["args"]);
            let listen = args
                .iter()
                .position(|a| *a == "--metrics-listen")
                .and_then(|i| args.get(i + 1))
                .unwrap_or_else(|| panic!("{}: {name} has no --metrics-listen: {args:?}", r.dir));
            assert_eq!(
                listen.rsplit_once(':').map(|(_, p)| p),
                Some(port),
                "{}: {name}",
                r.dir
            );
            let declared = main["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .find(|p| p["name"] == "metrics")
                .and_then(|p| p["containerPort"].as_u64())
                .map(|p| p.to_string());
            assert_eq!(declared.as_deref(), Some(port), "{}: {name}", r.dir);
        }
    }
}
