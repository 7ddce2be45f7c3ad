//! The FAKE API server's in-memory state: objects, the resourceVersion counter, the watch
//! history, and the knobs tests turn (denials, secrets, unpullable images).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use super::HISTORY;

/// A failed request, rendered as a `Status` object.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn not_found(resource: &str, name: &str) -> ApiError {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{resource} \"{name}\" not found"),
            details: json!({"name": name, "kind": resource}),
        }
    }

    pub fn already_exists(resource: &str, name: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{resource} \"{name}\" already exists"),
            details: json!({"name": name, "kind": resource}),
        }
    }

    pub fn conflict(resource: &str, group: &str, name: &str) -> ApiError {
        let qualified = if group.is_empty() {
            resource.to_owned()
        } else {
            format!("{resource}.{group}")
        };
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {qualified} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
            details: json!({"name": name, "group": group, "kind": resource}),
        }
    }

    pub fn bad_request(message: String) -> ApiError {
        ApiError {
            code: 400,
            reason: "BadRequest",
            message,
            details: json!({}),
        }
    }

    pub fn gone(message: String) -> ApiError {
        ApiError {
            code: 410,
            reason: "Expired",
            message,
            details: json!({}),
        }
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        })
    }
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: String,
    pub ns: String,
    pub kind: &'static str,
    pub object: Value,
}

/// What the kubelet and the test controls share about one pod.
#[derive(Debug)]
pub(crate) struct PodCtl {
    /// Woken once the pod is marked for deletion.
    pub delete: Arc<Notify>,
    /// The process group of its running container, if any.
    pub pgid: Option<i32>,
    /// Set by `evict` before the kill, so the kubelet reports an eviction.
    pub evicted: bool,
    /// The grace period of the pending deletion.
    pub grace_seconds: Option<i64>,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    pub rv: u64,
    objects: BTreeMap<(String, String, String), Value>,
    history: VecDeque<Change>,
    /// Changes up to this resourceVersion are no longer in `history`.
    compacted: u64,
    pub denied: HashSet<(String, String)>,
    pub requests: Vec<(String, String)>,
    pub secrets: HashMap<(String, String), BTreeMap<String, String>>,
    pub unpullable: HashSet<String>,
    pub binaries: HashMap<String, PathBuf>,
    pub log_paths: HashMap<String, PathBuf>,
    pub pods: HashMap<(String, String), PodCtl>,
    uids: u64,
}

impl Store {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: &'static str, resource: &str, ns: &str, object: &Value) {
        self.history.push_back(Change {
            rv: self.rv,
            resource: resource.to_owned(),
            ns: ns.to_owned(),
            kind,
            object: object.clone(),
        });
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn key(resource: &str, ns: &str, name: &str) -> (String, String, String) {
        (resource.to_owned(), ns.to_owned(), name.to_owned())
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&Store::key(resource, ns, name))
    }

    /// The objects of `resource` in `ns` (all namespaces if `None`), by namespace and name.
    pub fn objects_in(&self, resource: &str, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| r == resource && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn new_uid(&mut self) -> String {
        self.uids += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = format!("{}-{}-{now}", std::process::id(), self.uids);
        let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        let h = hex::encode(&digest.as_ref()[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// The next pod address, unique in this process (every fake cluster of a test binary
    /// draws from one counter, as tests run side by side) and apart from other processes':
    /// `127.P.x.y`, where P follows the process id.
    pub fn next_pod_ip(&mut self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = 0x7f00_0000 + (((std::process::id() % 200) + 1) << 16);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed) + 2;
            if matches!(n % 256, 0 | 255) {
                continue;
            }
            return std::net::Ipv4Addr::from(base + n).to_string();
        }
    }

    /// Stores a new object (`metadata.name` or `generateName` set by the caller), filling the
    /// metadata the server owns.
    pub fn create(
        &mut self,
        resource: &str,
        kind: &str,
        api_version: &str,
        ns: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not an object".into()));
        }
        let mut name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            let Some(prefix) = object
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
            else {
                return Err(ApiError {
                    code: 422,
                    reason: "Invalid",
                    message: format!(
                        "{resource} \"\" is invalid: metadata.name: Required value: name or \
                         generateName is required"
                    ),
                    details: json!({"kind": resource}),
                });
            };
            name = format!("{prefix}{}", &self.new_uid()[..5]);
        }
        if self.get(resource, ns, &name).is_some() {
            return Err(ApiError::already_exists(resource, &name));
        }
        let rv = self.bump();
        let uid = self.new_uid();
        object["kind"] = json!(kind);
        object["apiVersion"] = json!(api_version);
        let meta = object
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
        if let Some(meta) = meta {
            if !meta.is_object() {
                *meta = json!({});
            }
            meta["name"] = json!(name);
            meta["namespace"] = json!(ns);
            meta["uid"] = json!(uid);
            meta["resourceVersion"] = json!(rv.to_string());
            meta["creationTimestamp"] = json!(now_rfc3339());
            meta["generation"] = json!(1);
            if let Some(m) = meta.as_object_mut() {
                m.remove("deletionTimestamp");
                m.remove("deletionGracePeriodSeconds");
            }
        }
        if resource == "pods" {
            object["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            object["spec"]["nodeName"] = json!("process-kubelet");
        }
        self.objects
            .insert(Store::key(resource, ns, &name), object.clone());
        self.record("ADDED", resource, ns, &object);
        Ok(object)
    }

    /// Replaces an object (`PUT`): 409 Conflict when the body's resourceVersion is set and is not
    /// the stored one.
    pub fn replace(
        &mut self,
        resource: &str,
        group: &str,
        ns: &str,
        name: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let Some(stored) = self.get(resource, ns, name).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not an object".into()));
        }
        let body_name = object.pointer("/metadata/name").and_then(Value::as_str);
        if body_name.is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                body_name.unwrap_or_default()
            )));
        }
        let wanted = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let current = stored
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !wanted.is_empty() && wanted != current {
            return Err(ApiError::conflict(resource, group, name));
        }
        let kept_meta = stored["metadata"].clone();
        let generation = kept_meta["generation"].as_i64().unwrap_or(1);
        let changed_spec = stored.get("spec") != object.get("spec");
        let rv = self.bump();
        object["kind"] = stored["kind"].clone();
        object["apiVersion"] = stored["apiVersion"].clone();
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        for owned in ["name", "namespace", "uid", "creationTimestamp"] {
            meta[owned] = kept_meta[owned].clone();
        }
        meta["resourceVersion"] = json!(rv.to_string());
        meta["generation"] = json!(generation + i64::from(changed_spec));
        self.objects
            .insert(Store::key(resource, ns, name), object.clone());
        self.record("MODIFIED", resource, ns, &object);
        Ok(object)
    }

    /// Changes a stored object in place; a change bumps its resourceVersion and is a `MODIFIED`
    /// event. `None` if there is no such object.
    pub fn modify(
        &mut self,
        resource: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let key = Store::key(resource, ns, name);
        let mut object = self.objects.get(&key)?.clone();
        f(&mut object);
        if Some(&object) == self.objects.get(&key) {
            return Some(object);
        }
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key, object.clone());
        self.record("MODIFIED", resource, ns, &object);
        Some(object)
    }

    /// Removes an object: a `DELETED` event carrying its last state.
    pub fn remove(&mut self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let mut object = self.objects.remove(&Store::key(resource, ns, name))?;
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record("DELETED", resource, ns, &object);
        Some(object)
    }

    /// The changes after `rv`, or `Err` if some of them were compacted away.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Change>, u64> {
        if rv < self.compacted {
            return Err(self.compacted);
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.iter().skip(start).cloned().collect())
    }
}

/// The state shared by the HTTP handlers, the kubelet and the test's handle.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion, for watches to wait on.
    pub changed: watch::Sender<u64>,
    /// New pods, for the kubelet.
    pub kubelet: mpsc::UnboundedSender<(String, String)>,
}

impl Shared {
    pub fn new() -> (Arc<Shared>, mpsc::UnboundedReceiver<(String, String)>) {
        let (kubelet, rx) = mpsc::unbounded_channel();
        let shared = Shared {
            store: Mutex::new(Store::default()),
            changed: watch::channel(0).0,
            kubelet,
        };
        (Arc::new(shared), rx)
    }

    /// The store, for reading or for changes that no watch needs to hear about at once.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the store, then wakes the watches.
    pub fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let (result, rv) = {
            let mut store = self.lock();
            let result = f(&mut store);
            (result, store.rv)
        };
        self.changed.send_replace(rv);
        result
    }

    /// Kills the container of the pod named `name`; see `FakeApiServer::kill_pod_process`.
    pub fn kill_pod(&self, name: &str, evict: bool) -> bool {
        let pgid = {
            let mut store = self.lock();
            let Some(ctl) = store
                .pods
                .iter_mut()
                .find(|((_, n), ctl)| n == name && ctl.pgid.is_some())
                .map(|(_, ctl)| ctl)
            else {
                return false;
            };
            ctl.evicted |= evict;
            ctl.pgid
        };
        if let Some(pgid) = pgid {
            super::kubelet::signal_container(pgid, libc::SIGKILL);
        }
        true
    }

    /// SIGKILLs every pod's processes (the server is going away).
    pub fn kill_all_processes(&self) {
        let groups: Vec<i32> = self.lock().pods.values().filter_map(|c| c.pgid).collect();
        for pgid in groups {
            super::kubelet::signal_container(pgid, libc::SIGKILL);
        }
    }
}

/// Now as RFC 3339 in UTC with seconds, as Kubernetes writes timestamps.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

pub(crate) fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn pod_ips_skip_network_and_broadcast_octets() {
        let mut store = Store::default();
        let ips: Vec<String> = (0..260).map(|_| store.next_pod_ip()).collect();
        let second = (std::process::id() % 200) + 1;
        assert!(ips
            .iter()
            .all(|ip| ip.starts_with(&format!("127.{second}."))));
        assert!(!ips
            .iter()
            .any(|ip| ip.ends_with(".0") || ip.ends_with(".255")));
        let unique: HashSet<&String> = ips.iter().collect();
        assert_eq!(unique.len(), ips.len());
    }

    #[test]
    fn a_watch_from_before_the_history_is_gone() {
        let mut store = Store::default();
        for i in 0..HISTORY + 5 {
            let lease = json!({"metadata": {"name": format!("l{i}")}});
            store
                .create("leases", "Lease", "coordination.k8s.io/v1", "ns", lease)
                .unwrap();
        }
        assert_eq!(store.changes_since(1).err(), Some(5));
        assert_eq!(store.changes_since(4).err(), Some(5));
        let recent = store.changes_since(5).unwrap();
        assert_eq!(recent.len(), HISTORY);
        assert_eq!(recent[0].rv, 6);
        assert!(store.changes_since(store.rv).unwrap().is_empty());
    }
}
