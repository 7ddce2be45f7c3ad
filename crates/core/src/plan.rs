//! Prepare plans: an engine and an ordered chain of steps, each step giving one state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::EngineFingerprint;
use crate::id::StateId;
use crate::identity::{base_state_id, step_state_id};

/// What one psql step runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PsqlInput {
    /// `-f FILE`. `path` is what the user typed; only `sha256` (of the content) is identity.
    File { path: String, sha256: String },
    /// `-c SQL`.
    Command { sql: String },
}

/// One psql invocation with `ON_ERROR_STOP=1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsqlStep {
    pub input: PsqlInput,
    /// `-v NAME=VALUE` variables, visible to the script as `:NAME`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
    /// `-1`: run the whole input in one transaction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_transaction: bool,
}

/// One prepare step. Only psql exists now; migration tools slot in as further variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Psql(PsqlStep),
}

impl Step {
    /// A short label for progress lines and errors: the file as given, or the command.
    pub fn label(&self) -> String {
        match self {
            Step::Psql(PsqlStep {
                input: PsqlInput::File { path, .. },
                ..
            }) => path.clone(),
            Step::Psql(PsqlStep {
                input: PsqlInput::Command { sql },
                ..
            }) => {
                let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                if one_line.chars().count() > 40 {
                    let cut: String = one_line.chars().take(37).collect();
                    format!("-c '{cut}...'")
                } else {
                    format!("-c '{one_line}'")
                }
            }
        }
    }
}

/// The states of a plan: the base first, then one per step, each the child of the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
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
    Chain { base, steps: ids }
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
