//! The base engine of every state: a PostgreSQL version and the options initdb ran with.

use serde::{Deserialize, Serialize};

/// The options a base data directory is created with. They are part of the base state's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitdbOptions {
    pub encoding: String,
    pub locale: String,
    pub data_checksums: bool,
}

impl Default for InitdbOptions {
    /// UTF8 and the C locale: the same collation on every machine, whatever its environment.
    fn default() -> Self {
        Self {
            encoding: "UTF8".to_owned(),
            locale: "C".to_owned(),
            data_checksums: false,
        }
    }
}

impl InitdbOptions {
    /// The initdb arguments that realise these options.
    pub fn initdb_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--encoding={}", self.encoding),
            format!("--locale={}", self.locale),
        ];
        if self.data_checksums {
            args.push("--data-checksums".to_owned());
        }
        args
    }
}

/// What a base state is made of: engine name, major and minor version, initdb options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineFingerprint {
    pub major: u32,
    pub minor: u32,
    pub initdb: InitdbOptions,
}

impl EngineFingerprint {
    /// "PostgreSQL 15.18".
    pub fn version(&self) -> String {
        format!("PostgreSQL {}.{}", self.major, self.minor)
    }
}

/// Why `postgres --version` output could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read a PostgreSQL version from {0:?}")]
pub struct VersionParseError(String);

/// The (major, minor) version in the output of `postgres --version`, such as
/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` or `postgres (PostgreSQL) 17devel`.
pub fn parse_server_version(output: &str) -> Result<(u32, u32), VersionParseError> {
    let err = || VersionParseError(output.trim().chars().take(200).collect());
    let rest = output.split(')').nth(1).ok_or_else(err)?.trim_start();
    let token: &str = rest.split_whitespace().next().ok_or_else(err)?;
    let digits_end = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let major_end = digits_end(token);
    let major: u32 = token[..major_end].parse().map_err(|_| err())?;
    let minor = match token[major_end..].strip_prefix('.') {
        Some(after) => after[..digits_end(after)].parse().map_err(|_| err())?,
        None => 0,
    };
    Ok((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_release_and_devel_versions() {
        assert_eq!(
            parse_server_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Ok((15, 18))
        );
        assert_eq!(
            parse_server_version("postgres (PostgreSQL) 16.4"),
            Ok((16, 4))
        );
        assert_eq!(
            parse_server_version("postgres (PostgreSQL) 17devel"),
            Ok((17, 0))
        );
        assert!(parse_server_version("bash: postgres: not found").is_err());
        assert!(parse_server_version("postgres (PostgreSQL) x").is_err());
    }

    #[test]
    fn initdb_args_follow_options() {
        let mut o = InitdbOptions::default();
        assert_eq!(o.initdb_args(), ["--encoding=UTF8", "--locale=C"]);
        o.data_checksums = true;
        assert!(o.initdb_args().contains(&"--data-checksums".to_owned()));
    }
}
