//! `<home>/config.toml`: the lifecycle policy's settings. Every field has a named default that
//! suits a laptop; `taidon local` flags override the file; [`Config::validate`] checks the
//! whole before it is used.
//!
//! ```toml
//! [instances]
//! idle_timeout_s = 600          # no connection for this long: the instance stops
//! lease_ttl_s = 3600            # no activity (resolve/touch/release) for this long: stops
//! max = 16                      # running instances, standbys included
//! memory_budget_mb = 4096       # ... and their memory, counted per instance as below
//! memory_per_instance_mb = 128
//!
//! [store]
//! capacity_mb = 20480           # eviction starts above this (0: no limit)
//! low_water = 0.8               # ... and stops at this share of it
//! max_replay_s = 600            # checkpoint rule: no state may need more replay than this
//! max_parallel_builds = 2       # the store's I/O budget
//! verify = false                # check a snapshot's checksum before each clone of it;
//!                               # a damaged one is quarantined (sqlrs fsck checks them all)
//!
//! [store.remote]                # snapshots also in an S3-compatible bucket (optional)
//! url = "s3://bucket/prefix"
//! endpoint = "http://127.0.0.1:9000"   # an S3-compatible server instead of AWS
//! allow_http = false
//! region = "us-east-1"          # credentials: the standard AWS variables and files
//! capacity_mb = 0               # remote eviction starts above this (0: no limit)
//! low_water = 0.8
//! gc_grace_s = 3600             # an unreferenced chunk younger than this is kept
//! gc_every_s = 300              # how often remote eviction and chunk collection run
//! upload_concurrency = 2        # snapshots uploaded at once
//!
//! [lifecycle]
//! tick_ms = 1000                # how often idle instances, the store and the pool are checked
//!
//! [policy.weights]              # the retention score
//! frequency = 1.0
//! build_cost = 1.0
//! size = 1.0
//! age_half_life_ms = 86400000
//! pin_bonus = 1000.0
//! released_pr_factor = 0.0
//!
//! [policy.standby]              # pre-started instances of HOT states
//! pinned = 1
//! busy = 1
//! other = 0
//! busy_window_ms = 600000
//! busy_accesses = 2
//!
//! [webhook]
//! secret = "..."                # HMAC-SHA256 key; else <home>/webhook.secret
//!
//! [leases]                      # fresh copies for tests (POST /v1/leases, sqlrs lease)
//! default_ttl_s = 600           # a lease nobody releases is reclaimed after this
//! max_ttl_s = 86400             # asking for longer is refused (400)
//! wait_s = 60                   # how long a request waits for a copy, then 503
//! min_ready = 2                 # databases kept ready per state being leased ...
//! max_ready = 16                # ... up to this, as the recent lease rate asks
//! max_databases = 256           # leased and ready databases in one instance
//! parallel = 0                  # databases made at once per instance (0: the cores)
//! strategy = "file_copy"        # CREATE DATABASE … STRATEGY (PostgreSQL 15+): file_copy, wal_log
//! host_idle_s = 300             # an instance of leased databases none uses stops after this
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use taidon_core::policy::{InstanceLimits, StandbyPolicy, StoreLimits, Weights};

const MIB: u64 = 1024 * 1024;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("invalid setting {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub instances: InstancesConfig,
    pub store: StoreConfig,
    pub lifecycle: LoopConfig,
    pub policy: PolicyConfig,
    pub webhook: WebhookConfig,
    pub leases: LeasesConfig,
}

/// `[leases]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeasesConfig {
    pub default_ttl_s: u64,
    pub max_ttl_s: u64,
    pub wait_s: u64,
    pub min_ready: usize,
    pub max_ready: usize,
    pub max_databases: usize,
    pub parallel: usize,
    pub strategy: String,
    pub host_idle_s: u64,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        Self {
            // Ten minutes outlives a slow test; a forgotten lease does not outlive a lunch.
            default_ttl_s: 600,
            max_ttl_s: 24 * 3600,
            wait_s: 60,
            min_ready: 2,
            max_ready: 16,
            max_databases: 256,
            parallel: 0,
            // A file copy: 0.1 s for pagila here, against 0.12 to 0.35 s through the WAL.
            strategy: "file_copy".to_owned(),
            host_idle_s: 300,
        }
    }
}

impl LeasesConfig {
    /// Databases made at once in one instance: the setting, else one per core.
    pub fn parallelism(&self) -> usize {
        if self.parallel > 0 {
            return self.parallel;
        }
        std::thread::available_parallelism().map_or(2, usize::from)
    }
}

/// `[instances]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstancesConfig {
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: u64,
    #[serde(default = "default_max_instances")]
    pub max: usize,
    #[serde(default = "default_memory_budget_mb")]
    pub memory_budget_mb: u64,
    #[serde(default = "default_memory_per_instance_mb")]
    pub memory_per_instance_mb: u64,
}

/// Ten minutes: long enough for a coffee, short enough that a laptop does not fill up.
pub fn default_idle_timeout_s() -> u64 {
    600
}
/// One hour: the gateway touches every 10 s, so only a lost gateway lets a lease expire.
pub fn default_lease_ttl_s() -> u64 {
    3600
}
pub fn default_max_instances() -> usize {
    16
}
pub fn default_memory_budget_mb() -> u64 {
    4096
}
/// A default PostgreSQL (128 MB of shared buffers) with a few backends.
pub fn default_memory_per_instance_mb() -> u64 {
    128
}

impl Default for InstancesConfig {
    fn default() -> Self {
        Self {
            idle_timeout_s: default_idle_timeout_s(),
            lease_ttl_s: default_lease_ttl_s(),
            max: default_max_instances(),
            memory_budget_mb: default_memory_budget_mb(),
            memory_per_instance_mb: default_memory_per_instance_mb(),
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_capacity_mb")]
    pub capacity_mb: u64,
    #[serde(default = "default_low_water")]
    pub low_water: f64,
    #[serde(default = "default_max_replay_s")]
    pub max_replay_s: u64,
    #[serde(default = "default_max_parallel_builds")]
    pub max_parallel_builds: usize,
    /// Check a snapshot's tree checksum before it is cloned (an instance, a build's parent).
    #[serde(default)]
    pub verify: bool,
    /// `[store.remote]`: the object-storage tier, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteStoreConfig>,
}

/// `[store.remote]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteStoreConfig {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub capacity_mb: u64,
    #[serde(default = "default_low_water")]
    pub low_water: f64,
    #[serde(default = "default_gc_grace_s")]
    pub gc_grace_s: u64,
    #[serde(default = "default_gc_every_s")]
    pub gc_every_s: u64,
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
}

pub fn default_region() -> String {
    "us-east-1".to_owned()
}
/// An hour: far longer than any upload takes between putting a chunk and its manifest.
pub fn default_gc_grace_s() -> u64 {
    3600
}
pub fn default_gc_every_s() -> u64 {
    300
}
pub fn default_upload_concurrency() -> usize {
    2
}

impl RemoteStoreConfig {
    /// The bucket's address as the object tier takes it.
    pub fn bucket(&self) -> taidon_store_object::RemoteConfig {
        taidon_store_object::RemoteConfig {
            url: self.url.clone(),
            endpoint: self.endpoint.clone(),
            allow_http: self.allow_http,
            region: self.region.clone(),
        }
    }

    /// Remote eviction's thresholds, or `None` without a capacity.
    pub fn limits(&self) -> Option<StoreLimits> {
        (self.capacity_mb > 0).then(|| StoreLimits {
            high_water_bytes: self.capacity_mb * MIB,
            low_water_bytes: (self.capacity_mb as f64 * self.low_water * MIB as f64) as u64,
            max_replay_ms: u64::MAX,
        })
    }
}

/// 20 GiB.
pub fn default_capacity_mb() -> u64 {
    20 * 1024
}
pub fn default_low_water() -> f64 {
    0.8
}
/// Ten minutes of replay at most for any state after an eviction.
pub fn default_max_replay_s() -> u64 {
    600
}
/// Two builds at once: each is a PostgreSQL server writing to the store.
pub fn default_max_parallel_builds() -> usize {
    2
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            capacity_mb: default_capacity_mb(),
            low_water: default_low_water(),
            max_replay_s: default_max_replay_s(),
            max_parallel_builds: default_max_parallel_builds(),
            verify: false,
            remote: None,
        }
    }
}

/// `[lifecycle]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
}

pub fn default_tick_ms() -> u64 {
    1000
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            tick_ms: default_tick_ms(),
        }
    }
}

/// `[policy]`: the score's weights and the standby pool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub weights: Weights,
    pub standby: StandbyPolicy,
}

/// `[webhook]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// The shared HMAC secret; `<home>/webhook.secret` (created on first start) when absent.
    pub secret: Option<String>,
}

/// An error with its causes, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl Config {
    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned(),
        })
    }

    /// Checks every setting; the controller uses a configuration only after this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_owned(),
            })
        };
        if self.instances.idle_timeout_s == 0 {
            return bad("instances.idle_timeout_s", "must be at least 1");
        }
        if self.instances.lease_ttl_s == 0 {
            return bad("instances.lease_ttl_s", "must be at least 1");
        }
        if self.instances.max == 0 {
            return bad("instances.max", "must be at least 1");
        }
        if self.instances.memory_budget_mb < self.instances.memory_per_instance_mb {
            return bad(
                "instances.memory_budget_mb",
                "must hold at least one instance (memory_per_instance_mb)",
            );
        }
        if let Some(remote) = &self.store.remote {
            if let Err(e) = remote.bucket().validate() {
                return bad("store.remote.url", &e.to_string());
            }
            if !(remote.low_water > 0.0 && remote.low_water <= 1.0) {
                return bad("store.remote.low_water", "must be in (0, 1]");
            }
            if remote.gc_grace_s == 0 {
                return bad(
                    "store.remote.gc_grace_s",
                    "must be at least 1: with none, a collection could delete the chunks of an upload in flight",
                );
            }
            if remote.gc_every_s == 0 {
                return bad("store.remote.gc_every_s", "must be at least 1");
            }
            if remote.upload_concurrency == 0 {
                return bad("store.remote.upload_concurrency", "must be at least 1");
            }
        }
        if !(self.store.low_water > 0.0 && self.store.low_water <= 1.0) {
            return bad("store.low_water", "must be in (0, 1]");
        }
        if self.store.max_parallel_builds == 0 {
            return bad("store.max_parallel_builds", "must be at least 1");
        }
        if self.lifecycle.tick_ms < 10 {
            return bad("lifecycle.tick_ms", "must be at least 10");
        }
        let w = &self.policy.weights;
        for (field, v) in [
            ("policy.weights.frequency", w.frequency),
            ("policy.weights.build_cost", w.build_cost),
            ("policy.weights.size", w.size),
            ("policy.weights.pin_bonus", w.pin_bonus),
            ("policy.weights.released_pr_factor", w.released_pr_factor),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, "must be a finite number >= 0");
            }
        }
        let l = &self.leases;
        if l.default_ttl_s == 0 {
            return bad("leases.default_ttl_s", "must be at least 1");
        }
        if l.max_ttl_s < l.default_ttl_s {
            return bad("leases.max_ttl_s", "must be at least leases.default_ttl_s");
        }
        if !matches!(l.strategy.as_str(), "wal_log" | "file_copy") {
            return bad("leases.strategy", "must be wal_log or file_copy");
        }
        if l.max_ready < l.min_ready {
            return bad("leases.max_ready", "must be at least leases.min_ready");
        }
        if l.max_databases == 0 || l.max_databases < l.max_ready {
            return bad(
                "leases.max_databases",
                "must be at least 1 and at least leases.max_ready",
            );
        }
        if self.webhook.secret.as_deref().is_some_and(str::is_empty) {
            return bad("webhook.secret", "must not be empty");
        }
        Ok(())
    }

    /// The limits the policy applies to running instances.
    pub fn instance_limits(&self) -> InstanceLimits {
        InstanceLimits {
            max_instances: self.instances.max,
            memory_budget_bytes: self.instances.memory_budget_mb.saturating_mul(MIB),
            memory_per_instance_bytes: self.instances.memory_per_instance_mb.saturating_mul(MIB),
            idle_timeout_ms: self.instances.idle_timeout_s.saturating_mul(1000),
        }
    }

    /// The store's limits; `None` when its capacity is unlimited.
    pub fn store_limits(&self) -> Option<StoreLimits> {
        if self.store.capacity_mb == 0 {
            return None;
        }
        let high = self.store.capacity_mb.saturating_mul(MIB);
        Some(StoreLimits {
            high_water_bytes: high,
            low_water_bytes: (high as f64 * self.store.low_water) as u64,
            max_replay_ms: self.store.max_replay_s.saturating_mul(1000),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults_and_they_validate() {
        let c = Config::parse("", "x").unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
        assert_eq!(c.instances.idle_timeout_s, 600);
        assert_eq!(c.instance_limits().capacity(), 16);
    }

    #[test]
    fn sections_override_fields_and_unknown_keys_are_refused() {
        let c = Config::parse(
            "[instances]\nidle_timeout_s = 2\n[store]\ncapacity_mb = 10\nlow_water = 0.5\n\
             [policy.weights]\nsize = 0.5\n[webhook]\nsecret = \"s\"\n",
            "config.toml",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.instances.idle_timeout_s, 2);
        assert_eq!(c.instances.max, 16, "untouched fields keep their defaults");
        assert_eq!(c.policy.weights.size, 0.5);
        assert_eq!(c.policy.weights.frequency, 1.0);
        let l = c.store_limits().unwrap();
        assert_eq!((l.high_water_bytes, l.low_water_bytes), (10 * MIB, 5 * MIB));
        let e = Config::parse("[instances]\nidle_timeout = 2\n", "config.toml").unwrap_err();
        assert!(e.to_string().contains("idle_timeout"), "{e}");
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut c = Config::default();
        c.store.low_water = 1.5;
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting store.low_water: must be in (0, 1]"
        );
        let mut c = Config::default();
        c.instances.memory_budget_mb = 1;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.store.capacity_mb = 0;
        assert!(c.store_limits().is_none());
    }
}
