//! Prepare plans: an engine and an ordered chain of steps, each step giving one state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::EngineFingerprint;
use crate::id::StateId;
use crate::identity::{base_state_id, step_state_id};

/// What one psql step runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PsqlInput {
    /// `-f FILE` and the files it pulls in (its *input closure*). Only the contents (`sha256`
    /// and each include's) are identity; the paths say where each file lies, so that the
    /// controller can lay the closure out and run psql in `workdir` with `-f path`, and `\i`
    /// and `\ir` resolve there as they did for the user.
    File {
        /// The script as psql is given it: relative to `workdir`.
        path: String,
        sha256: String,
        /// Where psql runs, relative to the closure's root (empty: the root itself).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        workdir: String,
        /// Every file the script pulls in with `\i`, `\ir`, `\include` or
        /// `\include_relative`, recursively, in the order psql reads them (a file included
        /// twice is listed twice).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        includes: Vec<Included>,
    },
    /// `-c SQL`.
    Command { sql: String },
}

/// A file an input pulls in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Included {
    /// Where it lies, relative to the closure's root.
    pub path: String,
    pub sha256: String,
}

impl PsqlInput {
    /// Every file of the input's closure, as (path relative to the closure's root, sha256):
    /// the script first, then its includes. Empty for a command.
    pub fn files(&self) -> Vec<(String, &str)> {
        match self {
            PsqlInput::File {
                path,
                sha256,
                workdir,
                includes,
            } => std::iter::once((join_rel(workdir, path), sha256.as_str()))
                .chain(includes.iter().map(|i| (i.path.clone(), i.sha256.as_str())))
                .collect(),
            PsqlInput::Command { .. } => Vec::new(),
        }
    }
}

/// `base/rel`, lexically: `.` and `..` are resolved, so `a/b` + `../c` is `a/c`. A path that
/// would leave the root keeps its leading `..` (and is refused where that matters).
pub fn join_rel(base: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in base.split('/').chain(rel.split('/')) {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

/// One psql invocation with `ON_ERROR_STOP=1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PsqlStep {
    pub input: PsqlInput,
    /// `-v NAME=VALUE` variables, visible to the script as `:NAME`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
    /// `-1`: run the whole input in one transaction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_transaction: bool,
}

/// One Liquibase changeset, applied with `liquibase update-count --count=1` to its parent
/// state (where every changeset before it is applied, so it is the next one pending).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LiquibaseStep {
    /// The changeset's id, author and file, as Liquibase reports them.
    pub id: String,
    pub author: String,
    pub file: String,
    /// Liquibase's checksum of the changeset's content (`9:…`): it covers referenced SQL
    /// files and the changelog parameters substituted into it.
    pub checksum: String,
    /// The master changelog, relative to the closure's root (Liquibase's search path).
    pub changelog: String,
    /// Liquibase arguments besides the changelog (`--contexts`, `--labels`, `-DNAME=VALUE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Every file of the changelog's closure: the master, included changelogs, SQL and data
    /// files that changesets reference. Not identity: the checksum is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<Included>,
}

impl LiquibaseStep {
    /// `file::id::author`, as Liquibase names a changeset.
    pub fn name(&self) -> String {
        format!("{}::{}::{}", self.file, self.id, self.author)
    }
}

/// Any migration tool as one step (`prepare:cmd`): a command the client runs where its inputs
/// are, against the build server, with `DATABASE_URL` and the `PG*` variables set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommandStep {
    /// The program and its arguments, as given.
    pub argv: Vec<String>,
    /// The declared inputs: every file, with its path relative to the working directory the
    /// command runs in, in a stable order (directories walked, globs expanded, sorted). They
    /// stay on the client: only their hashes travel.
    #[serde(default)]
    pub inputs: Vec<Included>,
}

/// One prepare step: a psql invocation, one changeset of Liquibase, or a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Psql(PsqlStep),
    Liquibase(LiquibaseStep),
    Command(CommandStep),
}

impl Step {
    /// Whether only a client can run the step (a command, whose files the controller never
    /// holds): such a state cannot be rebuilt from the controller's records alone.
    pub fn client_only(&self) -> bool {
        matches!(self, Step::Command(_))
    }

    /// Every input file the step needs laid out, as (path relative to the closure's root,
    /// sha256).
    pub fn files(&self) -> Vec<(String, &str)> {
        match self {
            Step::Psql(p) => p.input.files(),
            // The client runs it where its files are: nothing is laid out.
            Step::Command(_) => Vec::new(),
            Step::Liquibase(l) => l
                .files
                .iter()
                .map(|f| (f.path.clone(), f.sha256.as_str()))
                .collect(),
        }
    }

    /// A short label for progress lines and errors: the file as given, or the command.
    pub fn label(&self) -> String {
        match self {
            Step::Psql(PsqlStep {
                input: PsqlInput::File { path, .. },
                ..
            }) => path.strip_prefix("./").unwrap_or(path).to_owned(),
            Step::Liquibase(l) => l.name(),
            Step::Command(c) => {
                // The program by its name, not its path.
                let mut words = c.argv.iter().map(String::as_str);
                let program = words.next().map(|p| p.rsplit('/').next().unwrap_or(p));
                let line = program
                    .into_iter()
                    .chain(words)
                    .collect::<Vec<_>>()
                    .join(" ");
                format!("cmd: {}", shortened(&line))
            }
            Step::Psql(PsqlStep {
                input: PsqlInput::Command { sql },
                ..
            }) => {
                let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                format!("-c '{}'", shortened(&one_line))
            }
        }
    }
}

/// `text` cut to 40 characters for a label, `...` marking the cut.
fn shortened(text: &str) -> String {
    if text.chars().count() > 40 {
        let cut: String = text.chars().take(37).collect();
        format!("{cut}...")
    } else {
        text.to_owned()
    }
}

/// The states of a plan: the base first, then one per step, each the child of the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The engine (version, initdb options, server settings) the base is made with.
    pub engine: EngineFingerprint,
    pub base: StateId,
    pub steps: Vec<StateId>,
}

impl Chain {
    /// The id of the whole chain: its last step's, or the base's when there are no steps.
    pub fn head(&self) -> StateId {
        self.steps.last().copied().unwrap_or(self.base)
    }

    /// The id of the parent of step `i` (0-based): the base for the first step.
    pub fn parent_of(&self, i: usize) -> StateId {
        if i == 0 {
            self.base
        } else {
            self.steps[i - 1]
        }
    }
}

/// The ids of every state that `steps` on `engine` produce.
pub fn chain(engine: &EngineFingerprint, steps: &[Step]) -> Chain {
    let base = base_state_id(engine);
    let mut parent = base;
    let ids = steps
        .iter()
        .map(|step| {
            parent = step_state_id(&parent, step);
            parent
        })
        .collect();
    Chain {
        engine: engine.clone(),
        base,
        steps: ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(sql: &str) -> Step {
        Step::Psql(PsqlStep {
            input: PsqlInput::Command { sql: sql.into() },
            variables: BTreeMap::new(),
            single_transaction: false,
        })
    }

    #[test]
    fn label_names_file_or_shortened_command() {
        let f = Step::Psql(PsqlStep {
            input: PsqlInput::File {
                path: "db/schema.sql".into(),
                sha256: "00".repeat(32),
                workdir: String::new(),
                includes: Vec::new(),
            },
            variables: BTreeMap::new(),
            single_transaction: false,
        });
        assert_eq!(f.label(), "db/schema.sql");
        assert_eq!(cmd("select\n 1").label(), "-c 'select 1'");
        assert!(cmd(&"x".repeat(100)).label().ends_with("...'"));
    }

    #[test]
    fn chain_links_each_step_to_the_one_before() {
        let engine = EngineFingerprint {
            major: 15,
            minor: 18,
            initdb: Default::default(),
            settings: Default::default(),
        };
        let steps = [cmd("create table a()"), cmd("create table b()")];
        let c = chain(&engine, &steps);
        assert_eq!(c.steps.len(), 2);
        assert_eq!(c.parent_of(0), c.base);
        assert_eq!(c.parent_of(1), c.steps[0]);
        assert_eq!(c.head(), c.steps[1]);
        assert_eq!(c.steps[1], step_state_id(&c.steps[0], &steps[1]));
        // A prefix of the plan shares the prefix of the chain.
        assert_eq!(chain(&engine, &steps[..1]).steps[0], c.steps[0]);
        assert_eq!(chain(&engine, &[]).head(), c.base);
    }

    #[test]
    fn steps_serialize_with_kind_and_type_tags() {
        let json = serde_json::to_value(cmd("select 1")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "psql", "input": {"type": "command", "sql": "select 1"}})
        );
        let back: Step = serde_json::from_value(json).unwrap();
        assert_eq!(back, cmd("select 1"));
    }
}
