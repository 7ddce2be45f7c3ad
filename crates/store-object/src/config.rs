//! Where the object tier keeps snapshots.

use serde::{Deserialize, Serialize};

use crate::RemoteError;

/// An S3-compatible bucket and a key prefix; credentials come from the standard AWS
/// environment variables.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// An S3-compatible endpoint (`http://host:port`) instead of AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allows a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// The bucket's region.
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

impl RemoteConfig {
    /// Checks the config and normalises the prefix (no leading or trailing `/`).
    pub fn validate(&mut self) -> Result<(), RemoteError> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            RemoteError::Config(format!("url {:?} is not s3://bucket/prefix", self.url))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(RemoteError::Config(format!("bad bucket name {bucket:?}")));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(RemoteError::Config(format!("bad prefix {prefix:?}")));
        }
        if let Some(endpoint) = &self.endpoint {
            let plain = endpoint.starts_with("http://");
            if !plain && !endpoint.starts_with("https://") {
                return Err(RemoteError::Config(format!(
                    "endpoint {endpoint:?} is not http(s)://host[:port]"
                )));
            }
            if plain && !self.allow_http {
                return Err(RemoteError::Config(format!(
                    "endpoint {endpoint:?} is plain HTTP and allow_http is false"
                )));
            }
        }
        if self.region.trim().is_empty() {
            return Err(RemoteError::Config("region is empty".to_owned()));
        }
        self.url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        Ok(())
    }

    /// The bucket and the key prefix ("" for none) of a validated config.
    pub(crate) fn bucket_and_prefix(&self) -> (&str, &str) {
        let rest = self.url.strip_prefix("s3://").unwrap_or(&self.url);
        rest.split_once('/').unwrap_or((rest, ""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> RemoteConfig {
        RemoteConfig {
            url: url.to_owned(),
            endpoint: None,
            allow_http: false,
            region: default_region(),
        }
    }

    #[test]
    fn validate_normalises_the_prefix() {
        let mut c = config("s3://taidon-snaps/team/a/");
        c.validate().unwrap();
        assert_eq!(c.url, "s3://taidon-snaps/team/a");
        assert_eq!(c.bucket_and_prefix(), ("taidon-snaps", "team/a"));
        let mut c = config("s3://taidon-snaps");
        c.validate().unwrap();
        assert_eq!(c.bucket_and_prefix(), ("taidon-snaps", ""));
    }

    #[test]
    fn validate_rejects_bad_urls_and_plain_http_unless_allowed() {
        for url in [
            "gs://b/p",
            "s3://",
            "s3://UPPER/p",
            "s3://b/../x",
            "s3://bucket/a//b",
        ] {
            assert!(config(url).validate().is_err(), "{url}");
        }
        let mut c = config("s3://bucket");
        c.endpoint = Some("http://127.0.0.1:9000".to_owned());
        assert!(c.validate().is_err());
        c.allow_http = true;
        c.validate().unwrap();
        c.endpoint = Some("ftp://x".to_owned());
        assert!(c.validate().is_err());
    }

    #[test]
    fn config_reads_from_json_with_defaults() {
        let c: RemoteConfig = serde_json::from_str(r#"{"url":"s3://bucket/p"}"#).unwrap();
        assert_eq!(c, config("s3://bucket/p"));
    }
}
