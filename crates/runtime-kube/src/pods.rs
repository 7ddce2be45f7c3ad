//! The runner pods: their names, labels and specs (pure functions, golden-tested), and how a
//! pod's status reads as "ready", "still coming" or "failed, and why".

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use taidon_core::{InstanceId, StateId};
use taidon_store_object::RemoteConfig;

use crate::control::{CONTROL_PORT, POSTGRES_PORT};

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_ROLE: &str = "taidon.dev/role";
pub const LABEL_STATE: &str = "taidon.dev/state";
pub const LABEL_INSTANCE: &str = "taidon.dev/instance";
pub const ANNOTATION_STATE: &str = "taidon.dev/state-id";
/// The label selector of every pod this runtime makes.
pub const SELECTOR: &str =
    "app.kubernetes.io/managed-by=taidon,app.kubernetes.io/name=taidon-runner";
/// Where the pod's volume is mounted.
pub const DATA_MOUNT: &str = "/var/lib/taidon-runner";

/// What runner pods are made of: `[kubernetes]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub namespace: String,
    /// The runner image: the official postgres image of the engine's version plus `taidon`.
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
    /// The bucket the runners restore from and publish to.
    pub bucket: RemoteConfig,
    /// A Secret with `access_key_id` and `secret_access_key` for the bucket, if any.
    pub credentials_secret: Option<String>,
    /// How long a pod may stay Pending (unscheduled, pulling) before it is an error.
    pub pending_timeout: Duration,
    /// How long a scheduled pod may take to be ready (the restore included).
    pub ready_timeout: Duration,
}

impl PodSettings {
    /// Settings with the defaults for everything but the namespace, image and bucket.
    pub fn new(namespace: &str, image: &str, bucket: RemoteConfig) -> Self {
        Self {
            namespace: namespace.to_owned(),
            image: image.to_owned(),
            image_pull_policy: None,
            cpu_request: "250m".into(),
            memory_request: "256Mi".into(),
            cpu_limit: "2".into(),
            memory_limit: "1Gi".into(),
            bucket,
            credentials_secret: Some("taidon-object-store".into()),
            pending_timeout: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(600),
        }
    }
}

/// What a pod is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An instance restored from `state`.
    Instance { iid: InstanceId, state: StateId },
    /// A build of `state`: from `parent`'s snapshot, or a new cluster (no server: an
    /// initdb build publishes as soon as the data is made).
    Build {
        state: StateId,
        parent: Option<StateId>,
    },
}

impl Role {
    fn label(&self) -> &'static str {
        match self {
            Role::Instance { .. } => "instance",
            Role::Build { .. } => "build",
        }
    }

    fn state(&self) -> StateId {
        match self {
            Role::Instance { state, .. } | Role::Build { state, .. } => *state,
        }
    }
}

/// The pod of instance `iid`: one name, so a restarted controller finds it.
pub fn instance_pod_name(iid: &InstanceId) -> String {
    format!("taidon-i-{iid}")
}

/// A new build pod's name: the state's short id and a random suffix (two controllers racing
/// on one state make two pods).
pub fn build_pod_name(state: &StateId) -> String {
    format!(
        "taidon-b-{}-{:06x}",
        state.short(),
        rand::random::<u32>() & 0xff_ffff
    )
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The runner pod `name` for `role`; `token` opens its control endpoint, `superuser_password`
/// lets a build's psql in.
pub fn runner_pod(
    settings: &PodSettings,
    name: &str,
    role: &Role,
    token: &str,
    superuser_password: Option<&str>,
    pg_settings: &BTreeMap<String, String>,
) -> Pod {
    let state = role.state();
    let mut labels = BTreeMap::from([
        (LABEL_NAME.to_owned(), "taidon-runner".to_owned()),
        (LABEL_MANAGED_BY.to_owned(), "taidon".to_owned()),
        (LABEL_ROLE.to_owned(), role.label().to_owned()),
        (LABEL_STATE.to_owned(), hex_prefix(&state)),
    ]);
    let (source, serve) = match role {
        Role::Instance { iid, state } => {
            labels.insert(LABEL_INSTANCE.to_owned(), iid.to_string());
            (state.to_string(), true)
        }
        Role::Build {
            parent: Some(parent),
            ..
        } => (parent.to_string(), true),
        Role::Build { parent: None, .. } => ("initdb".to_owned(), false),
    };
    let mut envs = vec![
        env_field("TAIDON_POD_IP", "status.podIP"),
        env("TAIDON_RUNNER_DATA", DATA_MOUNT),
        env("TAIDON_RUNNER_SOURCE", source),
        env("TAIDON_RUNNER_SERVE", serve.to_string()),
        env("TAIDON_RUNNER_TOKEN", token),
        env("TAIDON_BUCKET_URL", settings.bucket.url.clone()),
        env("TAIDON_BUCKET_REGION", settings.bucket.region.clone()),
        env(
            "TAIDON_BUCKET_ALLOW_HTTP",
            settings.bucket.allow_http.to_string(),
        ),
        env("RUST_LOG", "info"),
    ];
    if let Some(endpoint) = &settings.bucket.endpoint {
        envs.push(env("TAIDON_BUCKET_ENDPOINT", endpoint.clone()));
    }
    if let Some(password) = superuser_password {
        envs.push(env("TAIDON_SUPERUSER_PASSWORD", password));
    }
    if !pg_settings.is_empty() {
        // The recipe's server settings, for an initdb build to write into postgresql.conf.
        envs.push(env(
            "TAIDON_RUNNER_PG_SETTINGS",
            serde_json::to_string(pg_settings).unwrap_or_default(),
        ));
    }
    if let Some(secret) = &settings.credentials_secret {
        envs.push(env_secret("AWS_ACCESS_KEY_ID", secret, "access_key_id"));
        envs.push(env_secret(
            "AWS_SECRET_ACCESS_KEY",
            secret,
            "secret_access_key",
        ));
    }
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])
    };
    let container = Container {
        name: "runner".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec!["taidon".into(), "runner".into()]),
        env: Some(envs),
        ports: Some(vec![
            ContainerPort {
                name: Some("postgres".into()),
                container_port: i32::from(POSTGRES_PORT),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("control".into()),
                container_port: i32::from(CONTROL_PORT),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(i32::from(CONTROL_PORT)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(1),
            failure_threshold: Some(1),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&settings.cpu_request, &settings.memory_request)),
            limits: Some(quantities(&settings.cpu_limit, &settings.memory_limit)),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: DATA_MOUNT.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_STATE.to_owned(),
                state.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(30),
            enable_service_links: Some(false),
            automount_service_account_token: Some(false),
            volumes: Some(vec![Volume {
                name: "data".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The first 16 hex digits of a state id: a label value is at most 63 characters, so the
/// whole id is in an annotation.
fn hex_prefix(state: &StateId) -> String {
    state.to_string().chars().take(16).collect()
}

/// What a pod's status says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Ready: its runner answers on this IP.
    Ready(String),
    /// Scheduled or being scheduled; not ready yet.
    Coming,
    /// It will not become ready: why, in one line.
    Failed(String),
    /// Deleted, or being deleted.
    Gone,
}

/// Reasons a container waits that do not pass on their own (a first `ErrImagePull` may be a
/// transient failure; the kubelet says `ImagePullBackOff` once it gives up retrying at once).
const STUCK: &[&str] = &[
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

/// Reads `pod`'s status.
pub fn phase_of(pod: &Pod) -> Phase {
    if pod.metadata.deletion_timestamp.is_some() {
        return Phase::Gone;
    }
    let Some(status) = &pod.status else {
        return Phase::Coming;
    };
    let container = status.container_statuses.as_ref().and_then(|c| c.first());
    if let Some(waiting) = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
    {
        if let Some(reason) = waiting.reason.as_deref() {
            if STUCK.contains(&reason) {
                let message = waiting.message.as_deref().unwrap_or("");
                return Phase::Failed(
                    format!("{reason}: {message}")
                        .trim_end_matches([' ', ':'])
                        .to_owned(),
                );
            }
        }
    }
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            let terminated = container
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.as_ref());
            let mut why = match (&status.reason, &status.message) {
                (Some(reason), Some(message)) => format!("{reason}: {message}"),
                (Some(reason), None) => reason.clone(),
                _ => match terminated {
                    Some(t) => format!("the runner exited with code {}", t.exit_code),
                    None => format!("pod {}", status.phase.as_deref().unwrap_or("ended")),
                },
            };
            if let Some(last) = terminated
                .and_then(|t| t.message.as_deref())
                .and_then(last_error_line)
            {
                why.push_str(": ");
                why.push_str(last);
            }
            Phase::Failed(why)
        }
        Some("Running") => {
            let ready = status
                .conditions
                .as_ref()
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True");
            match (&status.pod_ip, ready) {
                (Some(ip), true) => Phase::Ready(ip.clone()),
                _ => Phase::Coming,
            }
        }
        _ => Phase::Coming,
    }
}

/// Why the scheduler has not placed `pod`, if it said.
pub fn unscheduled_reason(pod: &Pod) -> Option<String> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    Some(match (&condition.reason, &condition.message) {
        (Some(r), Some(m)) => format!("{r}: {m}"),
        (Some(r), None) => r.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => "not scheduled".into(),
    })
}

/// The line of a runner's log tail that says why it ended: its last error line, else its
/// last line.
fn last_error_line(log: &str) -> Option<&str> {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.contains("error") || l.contains("ERROR"))
        .or(lines.last())
        .copied()
}
