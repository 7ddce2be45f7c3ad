//! The base engine of every state: a PostgreSQL version and the options initdb ran with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The options a base data directory is created with. They are part of the base state's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// What a base state is made of: engine name, major and minor version, initdb options, and the
/// server settings the recipe asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EngineFingerprint {
    pub major: u32,
    pub minor: u32,
    pub initdb: InitdbOptions,
    /// `NAME = VALUE` server settings (`max_prepared_transactions = 10`), written into the base
    /// data directory's `postgresql.conf`, so every build server and every instance of the
    /// state's descendants runs with them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

impl EngineFingerprint {
    /// "PostgreSQL 15.18".
    pub fn version(&self) -> String {
        format!("PostgreSQL {}.{}", self.major, self.minor)
    }

    /// The `postgresql.conf` lines that realise the settings (empty when there are none).
    pub fn settings_conf(&self) -> String {
        if self.settings.is_empty() {
            return String::new();
        }
        let mut out = String::from("\n# Server settings of the recipe (part of the state's id).\n");
        for (name, value) in &self.settings {
            out.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        out
    }
}

/// Settings Taidon sets itself on every server's command line (where the server listens, how
/// it writes): a recipe cannot choose them.
pub const RESERVED_SETTINGS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
    "unix_socket_group",
    "fsync",
    "full_page_writes",
    "wal_recycle",
    "logging_collector",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "ssl",
];

/// Why a recipe's server setting is refused before PostgreSQL sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("--pg-setting {0:?}: expected NAME=VALUE")]
    Shape(String),
    #[error("server setting {0:?}: not a setting name (letters, digits, '_' and '.')")]
    Name(String),
    #[error(
        "server setting {0}: Taidon sets it on every server itself; a recipe cannot change it"
    )]
    Reserved(String),
}

/// Checks a setting's name: PostgreSQL's identifier shape (a dotted one is an extension's).
pub fn check_setting_name(name: &str) -> Result<(), SettingError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        return Err(SettingError::Name(name.to_owned()));
    }
    if RESERVED_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(SettingError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Parses `NAME=VALUE` (the value may be empty), as `--pg-setting` takes it.
pub fn parse_setting(text: &str) -> Result<(String, String), SettingError> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| SettingError::Shape(text.to_owned()))?;
    let name = name.trim();
    check_setting_name(name)?;
    Ok((name.to_owned(), value.trim().to_owned()))
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
    fn settings_are_checked_and_quoted() {
        assert_eq!(
            parse_setting("max_prepared_transactions=10"),
            Ok(("max_prepared_transactions".into(), "10".into()))
        );
        assert_eq!(
            parse_setting("pg_stat_statements.max = 100"),
            Ok(("pg_stat_statements.max".into(), "100".into()))
        );
        assert!(matches!(
            parse_setting("nothing"),
            Err(SettingError::Shape(_))
        ));
        assert!(matches!(parse_setting("1x=2"), Err(SettingError::Name(_))));
        assert!(matches!(parse_setting("a b=2"), Err(SettingError::Name(_))));
        assert!(matches!(
            parse_setting("FSYNC=on"),
            Err(SettingError::Reserved(_))
        ));
        let fp = EngineFingerprint {
            major: 15,
            minor: 18,
            initdb: InitdbOptions::default(),
            settings: BTreeMap::from([("search_path".into(), "a, 'b'".into())]),
        };
        assert!(fp.settings_conf().ends_with("search_path = 'a, ''b'''\n"));
    }

    #[test]
    fn initdb_args_follow_options() {
        let mut o = InitdbOptions::default();
        assert_eq!(o.initdb_args(), ["--encoding=UTF8", "--locale=C"]);
        o.data_checksums = true;
        assert!(o.initdb_args().contains(&"--data-checksums".to_owned()));
    }
}
