//! Which Taidon `sqlrs` talks to: the local daemon of a home (started on demand), or a shared
//! server named by `--server URL` / `SQLRS_SERVER`, or by a profile.
//!
//! Profiles live in `$SQLRS_CONFIG`, else `$XDG_CONFIG_HOME/sqlrs/config.toml`, else
//! `~/.config/sqlrs/config.toml`:
//!
//! ```toml
//! [profiles.team]
//! server = "https://taidon.example.com:7443"
//! token_file = "~/.config/sqlrs/team.token"
//! ca = "/etc/ssl/team-ca.pem"          # optional: a private CA
//! ```
//!
//! The token comes from `SQLRS_TOKEN`, else `--token-file`, else the profile's `token_file`.
//! Flags beat the environment, which beats the profile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::args::Global;

/// A shared server and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Server {
    pub(crate) url: String,
    pub(crate) token: String,
    /// A private CA to trust instead of the system's roots.
    pub(crate) ca: Option<PathBuf>,
}

/// Why the server settings cannot be used (bad input: exit 2).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("cannot read the sqlrs config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sqlrs config {path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("no profile {name:?} in {path} (profiles: {known})")]
    NoProfile {
        name: String,
        path: PathBuf,
        known: String,
    },
    #[error("profile {name:?} in {path} has no server")]
    NoServer { name: String, path: PathBuf },
    #[error("the server {url} needs a token: set SQLRS_TOKEN, or --token-file FILE")]
    NoToken { url: String },
    #[error("cannot read the token file {path}: {source}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    #[error("shutdown stops the local daemon; the server {url} is stopped where it runs")]
    NotLocal { url: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    server: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
}

/// What the environment says, read once so that choosing is pure.
#[derive(Debug, Default, Clone)]
pub(crate) struct RemoteEnv {
    pub(crate) server: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) profile: Option<String>,
    pub(crate) config: Option<PathBuf>,
    pub(crate) home: Option<PathBuf>,
}

impl RemoteEnv {
    pub(crate) fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let config = var("SQLRS_CONFIG").map(PathBuf::from).or_else(|| {
            var("XDG_CONFIG_HOME")
                .map(|d| PathBuf::from(d).join("sqlrs/config.toml"))
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config/sqlrs/config.toml")))
        });
        Self {
            server: var("SQLRS_SERVER"),
            token: var("SQLRS_TOKEN"),
            profile: var("SQLRS_PROFILE"),
            config,
            home: var("HOME").map(PathBuf::from),
        }
    }
}

/// `~/x` → `$HOME/x`.
fn expand(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_owned(),
    }
}

/// The server to talk to, or `None` for the local daemon.
pub(crate) fn choose(global: &Global, env: &RemoteEnv) -> Result<Option<Server>, RemoteError> {
    let profile_name = global.profile.clone().or_else(|| env.profile.clone());
    let profile = match &profile_name {
        None => Profile::default(),
        Some(name) => {
            let path = env.config.clone().unwrap_or_default();
            let text =
                std::fs::read_to_string(&path).map_err(|source| RemoteError::ReadConfig {
                    path: path.clone(),
                    source,
                })?;
            let file: ConfigFile = toml::from_str(&text).map_err(|e| RemoteError::BadConfig {
                path: path.clone(),
                message: e.message().to_owned(),
            })?;
            match file.profiles.get(name) {
                Some(p) => {
                    if p.server.is_none() {
                        return Err(RemoteError::NoServer {
                            name: name.clone(),
                            path,
                        });
                    }
                    p.clone()
                }
                None => {
                    return Err(RemoteError::NoProfile {
                        name: name.clone(),
                        path,
                        known: if file.profiles.is_empty() {
                            "none".to_owned()
                        } else {
                            file.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                        },
                    })
                }
            }
        }
    };
    let Some(url) = global
        .server
        .clone()
        .or_else(|| env.server.clone())
        .or(profile.server)
    else {
        return Ok(None);
    };
    let url = url.trim_end_matches('/').to_owned();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(RemoteError::BadUrl(url));
    }
    let home = env.home.as_deref();
    let token_file = global
        .token_file
        .clone()
        .or(profile.token_file)
        .map(|p| expand(&p, home));
    let token = match (&env.token, token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|source| RemoteError::ReadToken { path, source })?
            .trim()
            .to_owned(),
        (None, None) => return Err(RemoteError::NoToken { url }),
    };
    let ca = global.ca.clone().or(profile.ca).map(|p| expand(&p, home));
    Ok(Some(Server { url, token, ca }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global() -> Global {
        Global::default()
    }

    #[test]
    fn no_server_means_the_local_daemon() {
        assert_eq!(choose(&global(), &RemoteEnv::default()).unwrap(), None);
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(dir.path().join("team.token"), "from-file\n").unwrap();
        std::fs::write(
            &config,
            "[profiles.team]\nserver = \"https://team:7443/\"\ntoken_file = \"~/team.token\"\nca = \"~/ca.pem\"\n",
        )
        .unwrap();
        let env = RemoteEnv {
            config: Some(config.clone()),
            home: Some(dir.path().to_owned()),
            ..RemoteEnv::default()
        };
        let g = Global {
            profile: Some("team".into()),
            ..global()
        };
        assert_eq!(
            choose(&g, &env).unwrap(),
            Some(Server {
                url: "https://team:7443".into(),
                token: "from-file".into(),
                ca: Some(dir.path().join("ca.pem")),
            })
        );
        let env2 = RemoteEnv {
            server: Some("http://env:1".into()),
            token: Some("tok".into()),
            ..env.clone()
        };
        let s = choose(&g, &env2).unwrap().unwrap();
        assert_eq!((s.url.as_str(), s.token.as_str()), ("http://env:1", "tok"));
        let g2 = Global {
            server: Some("https://flag:2".into()),
            ..g.clone()
        };
        assert_eq!(choose(&g2, &env2).unwrap().unwrap().url, "https://flag:2");
    }

    #[test]
    fn bad_settings_say_what_and_where() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "[profiles.a]\nserver = \"https://a\"\n").unwrap();
        let env = RemoteEnv {
            config: Some(config.clone()),
            ..RemoteEnv::default()
        };
        let g = |p: &str| Global {
            profile: Some(p.into()),
            ..Global::default()
        };
        let e = choose(&g("b"), &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no profile \"b\" in {} (profiles: a)", config.display())
        );
        let e = choose(&g("a"), &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server https://a needs a token: set SQLRS_TOKEN, or --token-file FILE"
        );
        let e = choose(
            &Global {
                server: Some("taidon:7070".into()),
                ..Global::default()
            },
            &RemoteEnv::default(),
        )
        .unwrap_err();
        assert!(matches!(e, RemoteError::BadUrl(_)), "{e}");
        std::fs::write(&config, "[profiles.a]\nsrever = \"x\"\n").unwrap();
        let e = choose(&g("a"), &env).unwrap_err();
        assert!(e.to_string().contains("unknown field `srever`"), "{e}");
    }
}
