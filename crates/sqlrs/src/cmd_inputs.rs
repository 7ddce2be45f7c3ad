//! The declared inputs of a `prepare:cmd` step (`--input PATH`, repeatable): files,
//! directories (walked) and globs (`*`, `?`, `**`), hashed by content in a stable order. They
//! stay here: the command runs on this machine, and only names and hashes travel.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use taidon_core::identity::content_sha256;
use taidon_core::plan::Included;

/// Why the inputs cannot be read (bad input: exit 2, before anything runs).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CmdInputError {
    #[error("--input {0}: no such file or directory")]
    Missing(String),
    #[error("--input {0}: the pattern matches no file")]
    NoMatch(String),
    #[error("--input {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Every file the inputs name, relative to `cwd` ('/'-separated), each once, sorted by path,
/// with its content's sha256.
pub(crate) fn collect(cwd: &Path, inputs: &[String]) -> Result<Vec<Included>, CmdInputError> {
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for input in inputs {
        if input.contains(['*', '?', '[']) {
            let found = glob(cwd, input).map_err(|source| CmdInputError::Read {
                path: input.clone(),
                source,
            })?;
            if found.is_empty() {
                return Err(CmdInputError::NoMatch(input.clone()));
            }
            for rel in found {
                files.insert(rel.clone(), cwd.join(rel));
            }
            continue;
        }
        let abs = cwd.join(input);
        let meta = std::fs::metadata(&abs).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CmdInputError::Missing(input.clone()),
            _ => CmdInputError::Read {
                path: input.clone(),
                source: e,
            },
        })?;
        if meta.is_dir() {
            for rel in walk(&abs).map_err(|source| CmdInputError::Read {
                path: input.clone(),
                source,
            })? {
                let joined = format!("{}/{rel}", display_rel(input));
                files.insert(joined, abs.join(rel));
            }
        } else {
            files.insert(display_rel(input), abs);
        }
    }
    files
        .into_iter()
        .map(|(path, abs)| {
            let content = std::fs::read(&abs).map_err(|source| CmdInputError::Read {
                path: path.clone(),
                source,
            })?;
            Ok(Included {
                path,
                sha256: content_sha256(&content),
            })
        })
        .collect()
}

/// `./a//b/` as `a/b`.
fn display_rel(path: &str) -> String {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Every file under `dir`, recursively, relative to it ('/'-separated), sorted.
pub(crate) fn walk(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The files under `cwd` whose relative path matches `pattern`.
fn glob(cwd: &Path, pattern: &str) -> io::Result<Vec<String>> {
    let pattern = display_rel(pattern);
    let segments: Vec<&str> = pattern.split('/').collect();
    let fixed: Vec<&str> = segments
        .iter()
        .take_while(|s| !s.contains(['*', '?', '[']))
        .copied()
        .collect();
    let base = fixed.join("/");
    let root = cwd.join(&base);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let rest = &segments[fixed.len()..];
    Ok(walk(&root)?
        .into_iter()
        .filter(|rel| {
            let parts: Vec<&str> = rel.split('/').collect();
            matches_segments(rest, &parts)
        })
        .map(|rel| {
            if base.is_empty() {
                rel
            } else {
                format!("{base}/{rel}")
            }
        })
        .collect())
}

fn matches_segments(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| matches_segments(rest, &path[skip..])),
        Some((first, rest)) => match path.split_first() {
            Some((p, prest)) => {
                matches_segment(first.as_bytes(), p.as_bytes()) && matches_segments(rest, prest)
            }
            None => false,
        },
    }
}

/// `*` any run of characters, `?` one, `[abc]` one of a set.
fn matches_segment(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| matches_segment(rest, &name[skip..])),
        Some((b'?', rest)) => !name.is_empty() && matches_segment(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some(end) = rest.iter().position(|&c| c == b']') else {
                return name.first() == Some(&b'[') && matches_segment(rest, &name[1..]);
            };
            !name.is_empty()
                && rest[..end].contains(&name[0])
                && matches_segment(&rest[end + 1..], &name[1..])
        }
        Some((c, rest)) => name.first() == Some(c) && matches_segment(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_directories_and_globs_in_a_stable_order() {
        let dir = tempfile::tempdir().unwrap();
        let w = |p: &str, c: &str| {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, c).unwrap();
        };
        w("db/migrations/002_b.sql", "b");
        w("db/migrations/001_a.sql", "a");
        w("db/migrations/sub/003.sql", "c");
        w("db/notes.txt", "n");
        w("alembic.ini", "ini");
        let got = collect(
            dir.path(),
            &["alembic.ini".into(), "./db/migrations/".into()],
        )
        .unwrap();
        let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "alembic.ini",
                "db/migrations/001_a.sql",
                "db/migrations/002_b.sql",
                "db/migrations/sub/003.sql"
            ]
        );
        assert_eq!(got[0].sha256, content_sha256(b"ini"));
        let globbed = collect(dir.path(), &["db/**/*.sql".into()]).unwrap();
        assert_eq!(globbed.len(), 3);
        let one = collect(dir.path(), &["db/migrations/00?_[a].sql".into()]).unwrap();
        assert_eq!(one.len(), 1);
        assert!(matches!(
            collect(dir.path(), &["nope.sql".into()]),
            Err(CmdInputError::Missing(_))
        ));
        assert!(matches!(
            collect(dir.path(), &["db/*.none".into()]),
            Err(CmdInputError::NoMatch(_))
        ));
    }
}
