//! `taidon token create|revoke|list`: API tokens in a home's metadata. Works whether or not a
//! controller runs there: it reads every token from the metadata on each request.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use taidon_api::TokenRole;
use taidon_controller::home::Home;
use taidon_controller::meta::Meta;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Makes a token and prints it (only this once: the home keeps its hash).
    Create(CreateArgs),
    /// Revokes a token, given whole or by its id; it is refused from the next request on.
    Revoke {
        /// The data home of the controller.
        #[arg(long, env = "SQLRS_HOME")]
        home: PathBuf,
        /// The token, or its id (`taidon token list`).
        token_or_id: String,
    },
    /// Lists the tokens (never the tokens themselves).
    List {
        #[arg(long, env = "SQLRS_HOME")]
        home: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// The data home of the controller.
    #[arg(long, env = "SQLRS_HOME")]
    home: PathBuf,
    /// Who the token is for: the owner of the instances it creates.
    #[arg(long)]
    sub: String,
    /// An admin token: acts on every user's instances.
    #[arg(long, conflicts_with = "gateway")]
    admin: bool,
    /// A standalone gateway's token: resolve, touch, release and GET /v1/keys only.
    #[arg(long)]
    gateway: bool,
    /// How long the token lives (45s, 30m, 12h, 30d); for ever when absent.
    #[arg(long, value_parser = parse_duration_s)]
    ttl: Option<u64>,
}

/// Seconds in `45s`, `30m`, `12h`, `30d` or a plain number of seconds.
pub(crate) fn parse_duration_s(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration: use 45s, 30m, 12h or 30d");
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).filter(|v| *v > 0).ok_or_else(bad)
}

/// The metadata of an existing home (a token for a home that was never set up is a mistake).
fn open_meta(home: &Path) -> Result<Meta> {
    let home = Home::new(home);
    if !home.root().is_dir() {
        bail!(
            "{} is not a Taidon home (start `taidon controller --home {}` once first)",
            home.root().display(),
            home.root().display()
        );
    }
    let path = home.meta_db();
    Meta::open(&path).with_context(|| format!("cannot open {}", path.display()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create(a) => {
            let role = if a.admin {
                TokenRole::Admin
            } else if a.gateway {
                TokenRole::Gateway
            } else {
                TokenRole::User
            };
            let meta = open_meta(&a.home)?;
            let made = meta.create_token(&a.sub, role, a.ttl.map(|s| s * 1000), now_ms())?;
            println!("{}", made.token);
            let expires = match made.info.expires_ms {
                Some(ms) => format!("expires in {} s", (ms - made.info.created_ms) / 1000),
                None => "does not expire".to_owned(),
            };
            eprintln!(
                "token {} for {} ({}), {expires}",
                made.info.id, made.info.sub, made.info.role
            );
            Ok(())
        }
        TokenCommand::Revoke { home, token_or_id } => {
            let info = open_meta(&home)?.revoke_token(&token_or_id, now_ms())?;
            eprintln!("revoked token {} of {} ({})", info.id, info.sub, info.role);
            Ok(())
        }
        TokenCommand::List { home, json } => {
            let tokens = open_meta(&home)?.tokens()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(());
            }
            println!("{:<18}{:<10}{:<10}SUBJECT", "ID", "ROLE", "STATE");
            let now = now_ms();
            for t in tokens {
                let state = if t.revoked_ms.is_some() {
                    "revoked"
                } else if t.expires_ms.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!("{:<18}{:<10}{:<10}{}", t.id, t.role.as_str(), state, t.sub);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration_s("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration_s("30m"), Ok(1800));
        assert_eq!(parse_duration_s("45s"), Ok(45));
        assert_eq!(parse_duration_s("90"), Ok(90));
        assert!(parse_duration_s("0").is_err());
        assert!(parse_duration_s("3w").is_err());
        assert!(parse_duration_s("d").is_err());
        assert!(parse_duration_s("99999999999999999999d").is_err());
    }
}
