//! Resolving what a user typed (a full id or an 8+ hex prefix) against known ids.

/// The shortest prefix a user may type.
pub const MIN_PREFIX: usize = 8;

/// Why a typed id matched nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not an id: use at least {MIN_PREFIX} hex digits")]
    Malformed(String),
    #[error("no state or instance matches {0:?}")]
    NotFound(String),
    #[error("{prefix:?} is ambiguous: it matches {}", .matches.join(", "))]
    Ambiguous {
        prefix: String,
        matches: Vec<String>,
    },
}

/// Checks that `typed` can be a prefix at all, and returns it lowercased.
pub fn normalize(typed: &str) -> Result<String, PrefixError> {
    let t = typed.trim().to_ascii_lowercase();
    if t.len() < MIN_PREFIX || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PrefixError::Malformed(typed.to_owned()));
    }
    Ok(t)
}

/// The one candidate that starts with `typed`, or why there is not exactly one.
pub fn resolve<'a, I>(typed: &str, candidates: I) -> Result<&'a str, PrefixError>
where
    I: IntoIterator<Item = &'a str>,
{
    let prefix = normalize(typed)?;
    let mut matches: Vec<&'a str> = candidates
        .into_iter()
        .filter(|c| c.starts_with(&prefix))
        .collect();
    matches.sort_unstable();
    matches.dedup();
    match matches.as_slice() {
        [] => Err(PrefixError::NotFound(typed.to_owned())),
        [one] => Ok(one),
        many => Err(PrefixError::Ambiguous {
            prefix: typed.to_owned(),
            matches: many
                .iter()
                .map(|m| m[..m.len().min(16)].to_owned())
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: [&str; 3] = ["3f2a9c1e00000001", "3f2a9c1e00000002", "abcdef0123456789"];

    #[test]
    fn unique_prefix_and_full_id_resolve() {
        assert_eq!(resolve("abcdef01", IDS), Ok("abcdef0123456789"));
        assert_eq!(resolve("ABCDEF01", IDS), Ok("abcdef0123456789"));
        assert_eq!(resolve("3f2a9c1e00000002", IDS), Ok("3f2a9c1e00000002"));
    }

    #[test]
    fn short_non_hex_unknown_and_ambiguous_are_errors() {
        assert!(matches!(
            resolve("abc", IDS),
            Err(PrefixError::Malformed(_))
        ));
        assert!(matches!(
            resolve("zzzzzzzz", IDS),
            Err(PrefixError::Malformed(_))
        ));
        assert!(matches!(
            resolve("00000000", IDS),
            Err(PrefixError::NotFound(_))
        ));
        let err = resolve("3f2a9c1e", IDS).unwrap_err();
        assert!(matches!(&err, PrefixError::Ambiguous { matches, .. } if matches.len() == 2));
        assert!(err.to_string().contains("ambiguous"));
    }
}
