//! A prepare's inputs as they travel to the controller: each `-f` script's *closure* (the
//! script and every file it pulls in with `\i`, `\ir`, `\include`, `\include_relative`,
//! recursively, with psql's rules for relative paths), hashed by content. The files become
//! blobs the controller stores by hash; the steps carry their hashes and where they lie
//! relative to one root, so that the controller can lay them out and run psql as the user would.
//!
//! Hashing is skipped for a file whose (size, mtime, inode) did not change since it was last
//! hashed: a cache of hashes and include lists lives in `$SQLRS_CACHE_DIR` (else
//! `$XDG_CACHE_HOME/sqlrs`, else `~/.cache/sqlrs`).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use taidon_core::include::{scan, IncludeError, IncludeRef};
use taidon_core::plan::Included;
use taidon_core::{PsqlInput, PsqlStep, Step};

use crate::args::{Input, PsqlArgs};
use crate::client::BlobSource;

/// Why the inputs cannot be sent (each is bad input: exit 2, before any work).
#[derive(Debug, thiserror::Error)]
pub(crate) enum InputError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}:{line}: {meta} {target}: {source}")]
    MissingInclude {
        file: String,
        line: usize,
        meta: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {source}")]
    Unresolvable {
        file: String,
        #[source]
        source: IncludeError,
    },
    #[error("{file}:{line}: {meta} {target}: an absolute path cannot travel with the prepare; write it relative to the script (\\ir) or to the working directory (\\i)")]
    Absolute {
        file: String,
        line: usize,
        meta: &'static str,
        target: String,
    },
    #[error("include cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("-c '{0}': a command cannot include files (\\i); put it in a file and use -f")]
    CommandInclude(String),
    #[error("-f - (stdin) can be given once")]
    StdinTwice,
}

/// What a file's hash and includes were when it had this size, mtime and inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    sha256: String,
    /// (line, relative to the script, target).
    includes: Vec<(usize, bool, String)>,
}

/// The hash cache: read at start, written back (atomically) if it changed.
#[derive(Debug, Default)]
pub(crate) struct HashCache {
    file: Option<PathBuf>,
    entries: HashMap<String, Entry>,
    changed: bool,
    /// How many files were read and hashed (not served by the cache).
    pub(crate) hashed: usize,
}

impl HashCache {
    /// The cache of this user (none when no directory for it can be found).
    pub(crate) fn load() -> Self {
        let dir = std::env::var_os("SQLRS_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sqlrs")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sqlrs")));
        let Some(dir) = dir else {
            return Self::default();
        };
        let file = dir.join("hashes.json");
        let entries = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            file: Some(file),
            entries,
            changed: false,
            hashed: 0,
        }
    }

    /// Writes the cache back if it changed; a cache that cannot be written is no error.
    pub(crate) fn save(&self) {
        let (Some(file), true) = (&self.file, self.changed) else {
            return;
        };
        let Some(dir) = file.parent() else { return };
        let Ok(bytes) = serde_json::to_vec(&self.entries) else {
            return;
        };
        let tmp = dir.join(format!(".hashes-{}.tmp", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, file));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// The hash and includes of the file at `abs`, from the cache when it did not change.
    fn get(&mut self, abs: &Path, shown: &str) -> Result<(String, Vec<IncludeRef>), InputError> {
        let read_err = |source| InputError::Read {
            path: shown.to_owned(),
            source,
        };
        let meta = std::fs::metadata(abs).map_err(read_err)?;
        let key = abs.to_string_lossy().into_owned();
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if let Some(e) = self.entries.get(&key) {
            if (e.size, e.mtime_ns, e.ino) == (meta.len(), mtime_ns, meta.ino()) {
                let refs = e
                    .includes
                    .iter()
                    .map(|(line, rel, target)| IncludeRef {
                        line: *line,
                        relative_to_script: *rel,
                        target: target.clone(),
                    })
                    .collect();
                return Ok((e.sha256.clone(), refs));
            }
        }
        let content = std::fs::read(abs).map_err(read_err)?;
        self.hashed += 1;
        let (sha256, refs) = hash_and_scan(&content, shown)?;
        self.entries.insert(
            key,
            Entry {
                size: meta.len(),
                mtime_ns,
                ino: meta.ino(),
                sha256: sha256.clone(),
                includes: refs
                    .iter()
                    .map(|r| (r.line, r.relative_to_script, r.target.clone()))
                    .collect(),
            },
        );
        self.changed = true;
        Ok((sha256, refs))
    }
}

fn hash_and_scan(content: &[u8], shown: &str) -> Result<(String, Vec<IncludeRef>), InputError> {
    let sha256 = taidon_core::identity::content_sha256(content);
    let refs =
        scan(&String::from_utf8_lossy(content)).map_err(|source| InputError::Unresolvable {
            file: shown.to_owned(),
            source,
        })?;
    Ok((sha256, refs))
}

/// `path` with `.` and `..` resolved lexically (as psql's open() would through plain
/// directories).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `to` relative to the directory `from` (both absolute and normalized), with `..` as needed.
fn relative(from: &Path, to: &Path) -> String {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".to_owned(); a.len() - common];
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// The longest common ancestor of `paths` (absolute, normalized).
fn common_root<'a>(paths: impl IntoIterator<Item = &'a Path>) -> PathBuf {
    let mut root: Option<Vec<Component>> = None;
    for p in paths {
        let c: Vec<Component> = p.components().collect();
        root = Some(match root {
            None => c,
            Some(r) => r
                .into_iter()
                .zip(c)
                .take_while(|(x, y)| x == y)
                .map(|(x, _)| x)
                .collect(),
        });
    }
    root.map(|r| r.into_iter().collect())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The steps of a prepare, and the blobs they name.
#[derive(Debug)]
pub(crate) struct Collected {
    pub(crate) steps: Vec<Step>,
    /// sha256 → where its bytes are.
    pub(crate) blobs: BTreeMap<String, BlobSource>,
}

/// One script's closure while it is walked.
struct Walk<'a> {
    cwd: &'a Path,
    cache: &'a mut HashCache,
    /// Files of the closure in the order psql reads them: (absolute path, sha256).
    files: Vec<(PathBuf, String)>,
    /// The include stack, for cycles.
    stack: Vec<PathBuf>,
}

impl Walk<'_> {
    fn shown(&self, abs: &Path) -> String {
        match abs.strip_prefix(self.cwd) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => relative(self.cwd, abs),
        }
    }

    /// Walks the includes of the file at `abs` (whose refs are `refs`), depth first.
    fn includes(&mut self, abs: &Path, refs: Vec<IncludeRef>) -> Result<(), InputError> {
        self.stack.push(abs.to_owned());
        let script_dir = abs.parent().unwrap_or(self.cwd).to_owned();
        for r in refs {
            let meta = if r.relative_to_script { "\\ir" } else { "\\i" };
            if Path::new(&r.target).is_absolute() {
                return Err(InputError::Absolute {
                    file: self.shown(abs),
                    line: r.line,
                    meta,
                    target: r.target,
                });
            }
            let base = if r.relative_to_script {
                script_dir.as_path()
            } else {
                self.cwd
            };
            let child = normalize(&base.join(&r.target));
            if let Some(at) = self.stack.iter().position(|p| *p == child) {
                let mut cycle: Vec<String> =
                    self.stack[at..].iter().map(|p| self.shown(p)).collect();
                cycle.push(self.shown(&child));
                return Err(InputError::Cycle(cycle));
            }
            let shown = self.shown(&child);
            let (sha, child_refs) = match self.cache.get(&child, &shown) {
                Ok(found) => found,
                Err(InputError::Read { source, .. }) => {
                    return Err(InputError::MissingInclude {
                        file: self.shown(abs),
                        line: r.line,
                        meta,
                        target: r.target,
                        source,
                    })
                }
                Err(e) => return Err(e),
            };
            self.files.push((child.clone(), sha));
            self.includes(&child, child_refs)?;
        }
        self.stack.pop();
        Ok(())
    }
}

/// Reads, hashes and walks every input of `psql` (relative to `cwd`); `stdin` is read for
/// `-f -`.
pub(crate) fn collect(
    psql: &PsqlArgs,
    cwd: &Path,
    cache: &mut HashCache,
    stdin: &mut dyn Read,
) -> Result<Collected, InputError> {
    let cwd = normalize(cwd);
    // First every script's closure, as absolute paths; then one root for all of them.
    struct Script {
        main: PathBuf,
        sha256: String,
        includes: Vec<(PathBuf, String)>,
    }
    enum Item {
        Command(String),
        Script(Script),
    }
    let mut items: Vec<Item> = Vec::new();
    let mut blobs = BTreeMap::new();
    let mut stdin_used = false;
    for input in &psql.inputs {
        match input {
            Input::Command(sql) => {
                if scan(sql).map(|r| !r.is_empty()).unwrap_or(true) {
                    return Err(InputError::CommandInclude(sql.clone()));
                }
                items.push(Item::Command(sql.clone()));
            }
            Input::File(typed) => {
                let mut walk = Walk {
                    cwd: &cwd,
                    cache,
                    files: Vec::new(),
                    stack: Vec::new(),
                };
                let (main, sha256, refs) = if typed == "-" {
                    if std::mem::replace(&mut stdin_used, true) {
                        return Err(InputError::StdinTwice);
                    }
                    let mut content = Vec::new();
                    stdin
                        .read_to_end(&mut content)
                        .map_err(|source| InputError::Read {
                            path: "stdin".into(),
                            source,
                        })?;
                    let (sha256, refs) = hash_and_scan(&content, "stdin")?;
                    let main = cwd.join(format!(".sqlrs-stdin-{}.sql", &sha256[..12]));
                    blobs.insert(sha256.clone(), BlobSource::Bytes(content));
                    (main, sha256, refs)
                } else {
                    let main = normalize(&cwd.join(typed));
                    let (sha256, refs) = walk.cache.get(&main, typed)?;
                    blobs.insert(sha256.clone(), BlobSource::File(main.clone()));
                    (main, sha256, refs)
                };
                walk.includes(&main, refs)?;
                for (path, sha) in &walk.files {
                    blobs
                        .entry(sha.clone())
                        .or_insert_with(|| BlobSource::File(path.clone()));
                }
                items.push(Item::Script(Script {
                    main,
                    sha256,
                    includes: walk.files,
                }));
            }
        }
    }
    let root = common_root(
        std::iter::once(cwd.as_path()).chain(
            items
                .iter()
                .filter_map(|i| match i {
                    Item::Script(s) => Some(s),
                    Item::Command(_) => None,
                })
                .flat_map(|s| {
                    std::iter::once(s.main.parent().unwrap_or(&cwd))
                        .chain(s.includes.iter().map(|(p, _)| p.parent().unwrap_or(&cwd)))
                }),
        ),
    );
    let under_root = |p: &Path| relative(&root, p);
    let workdir = under_root(&cwd);
    let steps = items
        .into_iter()
        .map(|item| {
            let input = match item {
                Item::Script(s) => PsqlInput::File {
                    path: relative(&cwd, &s.main),
                    sha256: s.sha256,
                    workdir: workdir.clone(),
                    includes: s
                        .includes
                        .iter()
                        .map(|(p, sha)| Included {
                            path: under_root(p),
                            sha256: sha.clone(),
                        })
                        .collect(),
                },
                Item::Command(sql) => PsqlInput::Command { sql },
            };
            Step::Psql(PsqlStep {
                input,
                variables: psql.variables.clone(),
                single_transaction: psql.single_transaction,
            })
        })
        .collect();
    Ok(Collected { steps, blobs })
}

#[cfg(test)]
mod tests;
