//! The project file, `sqlrs.toml`: the engine version and settings, and named recipes that
//! say how to prepare a state.
//!
//! Parsing is pure: the caller reads the file and passes its text and display name, and every
//! error names that file, the line and the key, so a user can go straight to the mistake.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The prepare kinds a recipe may name as the first element of `prepare`.
pub const PREPARE_KINDS: [&str; 3] = ["psql", "lb", "cmd"];

const TOP_KEYS: &[&str] = &["engine", "recipes"];
const ENGINE_KEYS: &[&str] = &["version", "settings"];
const RECIPE_KEYS: &[&str] = &["prepare", "engine", "settings"];

/// A parsed `sqlrs.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Project {
    pub engine: EngineSection,
    pub recipes: BTreeMap<String, Recipe>,
    /// The display name of the file, for errors raised after parsing.
    pub file: String,
}

/// The `[engine]` table: the default engine version and PostgreSQL settings of every recipe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineSection {
    pub version: Option<EngineVersion>,
    pub settings: BTreeMap<String, String>,
}

/// A PostgreSQL version as a project asks for it: a major ("16") or a major.minor ("16.4").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EngineVersion {
    pub major: u32,
    pub minor: Option<u32>,
}

/// One `[recipes.NAME]` table as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// One of [`PREPARE_KINDS`].
    pub kind: String,
    pub args: Vec<String>,
    pub engine: Option<EngineVersion>,
    pub settings: BTreeMap<String, String>,
}

/// A recipe with the `[engine]` defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRecipe {
    pub name: String,
    pub kind: String,
    pub args: Vec<String>,
    /// The recipe's engine, else `[engine] version`, else none (the caller's default).
    pub engine: Option<EngineVersion>,
    /// `[engine.settings]` with the recipe's settings over them.
    pub settings: BTreeMap<String, String>,
}

/// Why an engine version string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid engine version '{0}' (expected a major like \"16\" or a major.minor like \"16.4\")"
)]
pub struct ParseEngineVersionError(pub String);

/// Why a project file could not be read, or a recipe not found in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectError {
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}:{line}: unknown key '{key}' in {table} (expected: {})", expected.join(", "))]
    UnknownKey {
        file: String,
        line: usize,
        key: String,
        table: String,
        expected: Vec<String>,
    },
    #[error("{file}:{line}: {path}: expected {expected}, found {found}{hint}")]
    WrongType {
        file: String,
        line: usize,
        path: String,
        expected: &'static str,
        found: &'static str,
        hint: &'static str,
    },
    #[error("{file}:{line}: {path}: missing key '{key}'")]
    MissingKey {
        file: String,
        line: usize,
        path: String,
        key: &'static str,
    },
    #[error(
        "{file}:{line}: {path}: empty array (expected the prepare kind, one of: psql, lb, cmd, \
         then its arguments)"
    )]
    EmptyPrepare {
        file: String,
        line: usize,
        path: String,
    },
    #[error(
        "{file}:{line}: {path}: unknown prepare kind '{kind}' (expected one of: psql, lb, cmd)"
    )]
    UnknownKind {
        file: String,
        line: usize,
        path: String,
        kind: String,
    },
    #[error(
        "{file}:{line}: {path}: invalid setting name '{name}' (expected [A-Za-z_][A-Za-z0-9_.]*)"
    )]
    InvalidSettingName {
        file: String,
        line: usize,
        path: String,
        name: String,
    },
    #[error("{file}:{line}: {path}: {source}")]
    InvalidVersion {
        file: String,
        line: usize,
        path: String,
        #[source]
        source: ParseEngineVersionError,
    },
    #[error("{file}: no recipe '{name}' ({})", known_list(known))]
    UnknownRecipe {
        name: String,
        file: String,
        known: Vec<String>,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "no recipes are defined".to_owned()
    } else {
        format!("known: {}", known.join(", "))
    }
}

impl FromStr for EngineVersion {
    type Err = ParseEngineVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseEngineVersionError(s.to_owned());
        // Digits only, no sign, no leading zero: the text is the canonical form, so that
        // Display gives back what was written.
        let number = |part: &str| -> Option<u32> {
            let digits = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
            if !digits || (part.len() > 1 && part.starts_with('0')) {
                return None;
            }
            part.parse().ok()
        };
        let (major, minor) = match s.split_once('.') {
            None => (number(s).ok_or_else(err)?, None),
            Some((major, minor)) => (
                number(major).ok_or_else(err)?,
                Some(number(minor).ok_or_else(err)?),
            ),
        };
        Ok(Self { major, minor })
    }
}

impl fmt::Display for EngineVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.minor {
            None => write!(f, "{}", self.major),
            Some(minor) => write!(f, "{}.{}", self.major, minor),
        }
    }
}

impl Project {
    /// The recipe called `name`, with the `[engine]` version and settings applied.
    pub fn recipe(&self, name: &str) -> Result<ResolvedRecipe, ProjectError> {
        let Some(recipe) = self.recipes.get(name) else {
            return Err(ProjectError::UnknownRecipe {
                name: name.to_owned(),
                file: self.file.clone(),
                known: self.recipes.keys().cloned().collect(),
            });
        };
        let mut settings = self.engine.settings.clone();
        settings.extend(recipe.settings.clone());
        Ok(ResolvedRecipe {
            name: name.to_owned(),
            kind: recipe.kind.clone(),
            args: recipe.args.clone(),
            engine: recipe.engine.or(self.engine.version),
            settings,
        })
    }
}

/// Parses the text of a project file; `file` is the name errors show (such as `sqlrs.toml`).
pub fn parse(text: &str, file: &str) -> Result<Project, ProjectError> {
    let root = toml::Deserializer::new(text)
        .deserialize_any(NodeVisitor)
        .map_err(|e| ProjectError::Syntax {
            file: file.to_owned(),
            line: e.span().map_or(1, |span| line_of(text, span.start)),
            // One line, like every other error: toml puts its "expected ..." on a second line.
            message: e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": "),
        })?;
    Walker { text, file }.project(&root)
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// --- A TOML tree that keeps the spans of keys and values -------------------------------------

/// A TOML value with its byte range in the file, where the parser knows it.
#[derive(Debug)]
struct Spanned {
    span: Option<Range<usize>>,
    node: Node,
}

#[derive(Debug)]
enum Node {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime,
    Array(Vec<Spanned>),
    Table(Vec<Entry>),
}

#[derive(Debug)]
struct Entry {
    key: String,
    key_span: Option<Range<usize>>,
    value: Spanned,
}

impl Node {
    fn type_name(&self) -> &'static str {
        match self {
            Node::String(_) => "string",
            Node::Integer(_) => "integer",
            Node::Float(_) => "float",
            Node::Boolean(_) => "boolean",
            Node::Datetime => "datetime",
            Node::Array(_) => "array",
            Node::Table(_) => "table",
        }
    }
}

// toml reports spans through serde_spanned's private protocol: asked for a struct with these
// names, it answers with a map of start, end and value. `toml::Spanned<T>` cannot be used
// directly because tables made implicitly (`[recipes.dev]` makes `recipes`) have no span, and
// then it fails instead of falling back; these visitors accept both answers.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME_FIELD: &str = "$__toml_private_datetime";

/// Deserializes a value, asking for its span.
struct SpannedSeed;

impl<'de> DeserializeSeed<'de> for SpannedSeed {
    type Value = Spanned;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Spanned, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, NodeVisitor)
    }
}

/// Deserializes the value inside a span answer (asking again would loop).
struct PlainSeed;

impl<'de> DeserializeSeed<'de> for PlainSeed {
    type Value = Spanned;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Spanned, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

fn unspanned(node: Node) -> Spanned {
    Spanned { span: None, node }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Spanned;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Spanned, E> {
        Ok(unspanned(Node::Boolean(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Spanned, E> {
        Ok(unspanned(Node::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Spanned, E> {
        let v = i64::try_from(v).map_err(|_| E::custom("integer out of range"))?;
        Ok(unspanned(Node::Integer(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Spanned, E> {
        Ok(unspanned(Node::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Spanned, E> {
        Ok(unspanned(Node::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Spanned, E> {
        Ok(unspanned(Node::String(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Spanned, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(SpannedSeed)? {
            items.push(item);
        }
        Ok(unspanned(Node::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Spanned, A::Error> {
        let Some(first) = map.next_key_seed(KeySeed)? else {
            return Ok(unspanned(Node::Table(Vec::new())));
        };
        if first.name == SPANNED_START {
            let start: usize = map.next_value()?;
            let _ = map.next_key_seed(KeySeed)?;
            let end: usize = map.next_value()?;
            let _ = map.next_key_seed(KeySeed)?;
            let mut value = map.next_value_seed(PlainSeed)?;
            value.span = Some(start..end);
            return Ok(value);
        }
        if first.name == DATETIME_FIELD {
            let _: String = map.next_value()?;
            return Ok(unspanned(Node::Datetime));
        }
        let mut entries = vec![Entry {
            key: first.name,
            key_span: first.span,
            value: map.next_value_seed(SpannedSeed)?,
        }];
        while let Some(key) = map.next_key_seed(KeySeed)? {
            entries.push(Entry {
                key: key.name,
                key_span: key.span,
                value: map.next_value_seed(SpannedSeed)?,
            });
        }
        Ok(unspanned(Node::Table(entries)))
    }
}

struct Key {
    name: String,
    span: Option<Range<usize>>,
}

/// Deserializes a table key, asking for its span.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML key")
    }

    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            name: v.to_owned(),
            span: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        let mut start = None;
        let mut end = None;
        let mut name = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                SPANNED_START => start = Some(map.next_value::<usize>()?),
                SPANNED_END => end = Some(map.next_value::<usize>()?),
                SPANNED_VALUE => name = Some(map.next_value::<String>()?),
                other => return Err(de::Error::unknown_field(other, SPANNED_FIELDS)),
            }
        }
        let name = name.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?;
        let span = start.zip(end).map(|(start, end)| start..end);
        Ok(Key { name, span })
    }
}

// --- From the tree to a Project --------------------------------------------------------------

struct Walker<'a> {
    text: &'a str,
    file: &'a str,
}

impl Walker<'_> {
    /// The line of a span, else of the nearest enclosing thing that has one.
    fn line(&self, span: Option<&Range<usize>>, fallback: usize) -> usize {
        span.map_or(fallback, |span| line_of(self.text, span.start))
    }

    fn wrong_type(
        &self,
        line: usize,
        path: &str,
        expected: &'static str,
        found: &Node,
    ) -> ProjectError {
        ProjectError::WrongType {
            file: self.file.to_owned(),
            line,
            path: path.to_owned(),
            expected,
            found: found.type_name(),
            hint: "",
        }
    }

    fn unknown_key(&self, line: usize, key: &str, table: &str, expected: &[&str]) -> ProjectError {
        ProjectError::UnknownKey {
            file: self.file.to_owned(),
            line,
            key: key.to_owned(),
            table: table.to_owned(),
            expected: expected.iter().map(|&s| s.to_owned()).collect(),
        }
    }

    fn table<'n>(
        &self,
        value: &'n Spanned,
        line: usize,
        path: &str,
    ) -> Result<&'n [Entry], ProjectError> {
        match &value.node {
            Node::Table(entries) => Ok(entries),
            other => Err(self.wrong_type(line, path, "a table", other)),
        }
    }

    fn project(&self, root: &Spanned) -> Result<Project, ProjectError> {
        let mut project = Project {
            file: self.file.to_owned(),
            ..Project::default()
        };
        for entry in self.table(root, 1, "the file")? {
            let line = self.line(entry.key_span.as_ref(), 1);
            match entry.key.as_str() {
                "engine" => project.engine = self.engine(&entry.value, line)?,
                "recipes" => {
                    for recipe in self.table(&entry.value, line, "recipes")? {
                        let recipe_line = self.line(recipe.key_span.as_ref(), line);
                        let parsed = self.recipe(&recipe.key, &recipe.value, recipe_line)?;
                        project.recipes.insert(recipe.key.clone(), parsed);
                    }
                }
                other => {
                    return Err(self.unknown_key(line, other, "the top-level table", TOP_KEYS))
                }
            }
        }
        Ok(project)
    }

    fn engine(&self, value: &Spanned, line: usize) -> Result<EngineSection, ProjectError> {
        let mut engine = EngineSection::default();
        for entry in self.table(value, line, "engine")? {
            let line = self.line(entry.key_span.as_ref(), line);
            match entry.key.as_str() {
                "version" => {
                    engine.version = Some(self.version(&entry.value, line, "engine.version")?);
                }
                "settings" => {
                    engine.settings = self.settings(&entry.value, line, "engine.settings")?;
                }
                other => return Err(self.unknown_key(line, other, "[engine]", ENGINE_KEYS)),
            }
        }
        Ok(engine)
    }

    fn recipe(&self, name: &str, value: &Spanned, line: usize) -> Result<Recipe, ProjectError> {
        let path = format!("recipes.{name}");
        let mut prepare = None;
        let mut engine = None;
        let mut settings = BTreeMap::new();
        for entry in self.table(value, line, &path)? {
            let line = self.line(entry.key_span.as_ref(), line);
            match entry.key.as_str() {
                "prepare" => {
                    prepare = Some(self.prepare(&entry.value, line, &format!("{path}.prepare"))?)
                }
                "engine" => {
                    engine = Some(self.version(&entry.value, line, &format!("{path}.engine"))?)
                }
                "settings" => {
                    settings = self.settings(&entry.value, line, &format!("{path}.settings"))?
                }
                other => {
                    return Err(self.unknown_key(line, other, &format!("[{path}]"), RECIPE_KEYS))
                }
            }
        }
        let Some((kind, args)) = prepare else {
            return Err(ProjectError::MissingKey {
                file: self.file.to_owned(),
                line,
                path,
                key: "prepare",
            });
        };
        Ok(Recipe {
            kind,
            args,
            engine,
            settings,
        })
    }

    /// `prepare = [kind, args...]`.
    fn prepare(
        &self,
        value: &Spanned,
        line: usize,
        path: &str,
    ) -> Result<(String, Vec<String>), ProjectError> {
        const EXPECTED: &str = "an array of strings";
        let Node::Array(items) = &value.node else {
            return Err(self.wrong_type(line, path, EXPECTED, &value.node));
        };
        let mut strings = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match &item.node {
                Node::String(s) => strings.push(s.clone()),
                other => {
                    let line = self.line(item.span.as_ref(), line);
                    return Err(self.wrong_type(line, &format!("{path}[{i}]"), "a string", other));
                }
            }
        }
        let mut strings = strings.into_iter();
        let Some(kind) = strings.next() else {
            return Err(ProjectError::EmptyPrepare {
                file: self.file.to_owned(),
                line,
                path: path.to_owned(),
            });
        };
        if !PREPARE_KINDS.contains(&kind.as_str()) {
            let line = items
                .first()
                .map_or(line, |first| self.line(first.span.as_ref(), line));
            return Err(ProjectError::UnknownKind {
                file: self.file.to_owned(),
                line,
                path: path.to_owned(),
                kind,
            });
        }
        Ok((kind, strings.collect()))
    }

    /// A version as a string ("16", "16.4") or an integer (16).
    fn version(
        &self,
        value: &Spanned,
        line: usize,
        path: &str,
    ) -> Result<EngineVersion, ProjectError> {
        let invalid = |text: String| ProjectError::InvalidVersion {
            file: self.file.to_owned(),
            line,
            path: path.to_owned(),
            source: ParseEngineVersionError(text),
        };
        match &value.node {
            Node::String(s) => s.parse().map_err(|_| invalid(s.clone())),
            Node::Integer(n) => u32::try_from(*n)
                .map(|major| EngineVersion { major, minor: None })
                .map_err(|_| invalid(n.to_string())),
            other => Err(ProjectError::WrongType {
                file: self.file.to_owned(),
                line,
                path: path.to_owned(),
                expected: "a string or an integer",
                found: other.type_name(),
                // 16.10 as a float would be 16.1: only a string keeps the minor exact.
                hint: if matches!(other, Node::Float(_)) {
                    " (write a major.minor version as a string, such as \"16.4\")"
                } else {
                    ""
                },
            }),
        }
    }

    fn settings(
        &self,
        value: &Spanned,
        line: usize,
        path: &str,
    ) -> Result<BTreeMap<String, String>, ProjectError> {
        let mut settings = BTreeMap::new();
        for entry in self.table(value, line, path)? {
            let line = self.line(entry.key_span.as_ref(), line);
            let text = match &entry.value.node {
                Node::String(s) => s.clone(),
                Node::Integer(n) => n.to_string(),
                Node::Boolean(b) => if *b { "on" } else { "off" }.to_owned(),
                // The text as written, so 1e-3 stays 1e-3; TOML's digit separators are
                // dropped because PostgreSQL would not read them.
                Node::Float(f) => match &entry.value.span {
                    Some(span) => self.text[span.clone()].replace('_', ""),
                    None => f.to_string(),
                },
                other => {
                    return Err(ProjectError::WrongType {
                        file: self.file.to_owned(),
                        line,
                        path: format!("{path}.{}", entry.key),
                        expected: "a string, integer, float or boolean",
                        found: other.type_name(),
                        hint: if matches!(other, Node::Table(_)) {
                            " (quote a dotted setting name: \"auto_explain.log_min_duration\" = ...)"
                        } else {
                            ""
                        },
                    })
                }
            };
            if !is_setting_name(&entry.key) {
                return Err(ProjectError::InvalidSettingName {
                    file: self.file.to_owned(),
                    line,
                    path: path.to_owned(),
                    name: entry.key.clone(),
                });
            }
            settings.insert(entry.key.clone(), text);
        }
        Ok(settings)
    }
}

/// `[A-Za-z_][A-Za-z0-9_.]*`: the names PostgreSQL accepts for settings.
fn is_setting_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"[engine]
version = "16"            # or an integer 16
[engine.settings]
max_prepared_transactions = 10
shared_preload_libraries = "pg_stat_statements"
fsync = false

[recipes.dev]
prepare = ["psql", "-f", "schema.sql", "-f", "seed.sql"]
[recipes.lb]
prepare = ["lb", "update", "--changelog-file", "db/changelog.xml"]
engine = "15"
[recipes.lb.settings]
work_mem = "64MB"
"#;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|&s| s.to_owned()).collect()
    }

    fn err(text: &str) -> String {
        parse(text, "sqlrs.toml").unwrap_err().to_string()
    }

    #[test]
    fn the_example_parses_to_exactly_its_values() {
        let project = parse(EXAMPLE, "sqlrs.toml").unwrap();
        let expected = Project {
            file: "sqlrs.toml".to_owned(),
            engine: EngineSection {
                version: Some(EngineVersion {
                    major: 16,
                    minor: None,
                }),
                settings: map(&[
                    ("fsync", "off"),
                    ("max_prepared_transactions", "10"),
                    ("shared_preload_libraries", "pg_stat_statements"),
                ]),
            },
            recipes: [
                (
                    "dev".to_owned(),
                    Recipe {
                        kind: "psql".to_owned(),
                        args: strings(&["-f", "schema.sql", "-f", "seed.sql"]),
                        engine: None,
                        settings: BTreeMap::new(),
                    },
                ),
                (
                    "lb".to_owned(),
                    Recipe {
                        kind: "lb".to_owned(),
                        args: strings(&["update", "--changelog-file", "db/changelog.xml"]),
                        engine: Some(EngineVersion {
                            major: 15,
                            minor: None,
                        }),
                        settings: map(&[("work_mem", "64MB")]),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(project, expected);
    }

    #[test]
    fn an_empty_file_is_an_empty_project() {
        let project = parse("", "sqlrs.toml").unwrap();
        assert_eq!(project.engine, EngineSection::default());
        assert!(project.recipes.is_empty());
    }

    #[test]
    fn recipes_resolve_against_the_engine_section() {
        let project = parse(EXAMPLE, "sqlrs.toml").unwrap();
        let dev = project.recipe("dev").unwrap();
        assert_eq!(dev.name, "dev");
        assert_eq!(dev.kind, "psql");
        assert_eq!(dev.args, strings(&["-f", "schema.sql", "-f", "seed.sql"]));
        assert_eq!(dev.engine, Some("16".parse().unwrap()));
        assert_eq!(dev.settings, project.engine.settings);

        let lb = project.recipe("lb").unwrap();
        assert_eq!(lb.engine, Some("15".parse().unwrap()));
        assert_eq!(
            lb.settings,
            map(&[
                ("fsync", "off"),
                ("max_prepared_transactions", "10"),
                ("shared_preload_libraries", "pg_stat_statements"),
                ("work_mem", "64MB"),
            ])
        );
    }

    #[test]
    fn recipe_settings_override_engine_settings() {
        let text = "[engine.settings]\nwork_mem = \"4MB\"\nfsync = true\n\
                    [recipes.x]\nprepare = [\"cmd\"]\nsettings = { work_mem = \"1GB\" }\n";
        let project = parse(text, "sqlrs.toml").unwrap();
        let x = project.recipe("x").unwrap();
        assert_eq!(x.settings, map(&[("fsync", "on"), ("work_mem", "1GB")]));
        assert_eq!(x.engine, None);
        assert!(x.args.is_empty());
    }

    #[test]
    fn an_unknown_recipe_lists_the_known_ones() {
        let project = parse(EXAMPLE, "sqlrs.toml").unwrap();
        let e = project.recipe("prod").unwrap_err();
        assert_eq!(
            e,
            ProjectError::UnknownRecipe {
                name: "prod".to_owned(),
                file: "sqlrs.toml".to_owned(),
                known: strings(&["dev", "lb"]),
            }
        );
        assert_eq!(
            e.to_string(),
            "sqlrs.toml: no recipe 'prod' (known: dev, lb)"
        );

        let empty = parse("[engine]\nversion = 16\n", "proj/sqlrs.toml").unwrap();
        assert_eq!(
            empty.recipe("dev").unwrap_err().to_string(),
            "proj/sqlrs.toml: no recipe 'dev' (no recipes are defined)"
        );
    }

    #[test]
    fn a_version_is_a_string_or_an_integer() {
        let v = |text: &str| parse(text, "sqlrs.toml").unwrap().engine.version;
        let major = |major| Some(EngineVersion { major, minor: None });
        assert_eq!(v("[engine]\nversion = 16\n"), major(16));
        assert_eq!(v("[engine]\nversion = \"16\"\n"), major(16));
        assert_eq!(
            v("[engine]\nversion = \"16.4\"\n"),
            Some(EngineVersion {
                major: 16,
                minor: Some(4)
            })
        );
        assert_eq!(v("engine = { version = 17 }\n"), major(17));
        assert_eq!(v("engine.version = 14\n"), major(14));
    }

    #[test]
    fn engine_versions_parse_and_display() {
        for text in ["16", "16.4", "9.6", "0", "17.10"] {
            let v: EngineVersion = text.parse().unwrap();
            assert_eq!(v.to_string(), text);
        }
        for bad in [
            "",
            "16.",
            ".4",
            "16.4.1",
            "v16",
            " 16",
            "16 ",
            "+16",
            "-1",
            "016",
            "16.04",
            "1e2",
            "99999999999",
        ] {
            assert_eq!(
                bad.parse::<EngineVersion>(),
                Err(ParseEngineVersionError(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn settings_values_become_postgresql_text() {
        let text = "[engine.settings]\n\
                    a = true\nb = false\nc = 42\nd = -7\ne = 0x10\nf = 1_000\n\
                    g = 0.5\nh = 1e-3\ni = 1_000.25\nj = \"64MB\"\nk = ''\n\
                    \"auto_explain.log_min_duration\" = 0\n";
        let settings = parse(text, "sqlrs.toml").unwrap().engine.settings;
        assert_eq!(
            settings,
            map(&[
                ("a", "on"),
                ("b", "off"),
                ("c", "42"),
                ("d", "-7"),
                ("e", "16"),
                ("f", "1000"),
                ("g", "0.5"),
                ("h", "1e-3"),
                ("i", "1000.25"),
                ("j", "64MB"),
                ("k", ""),
                ("auto_explain.log_min_duration", "0"),
            ])
        );
    }

    #[test]
    fn unknown_keys_name_the_file_line_key_and_table() {
        assert_eq!(
            err("# project\n\n[engine]\nverison = \"16\"\n"),
            "sqlrs.toml:4: unknown key 'verison' in [engine] (expected: version, settings)"
        );
        assert_eq!(
            err("[engine]\nversion = 16\n\n[recipe.dev]\nprepare = [\"psql\"]\n"),
            "sqlrs.toml:4: unknown key 'recipe' in the top-level table (expected: engine, recipes)"
        );
        assert_eq!(
            err("[recipes.dev]\nprepare = [\"psql\"]\nengin = \"15\"\n"),
            "sqlrs.toml:3: unknown key 'engin' in [recipes.dev] (expected: prepare, engine, settings)"
        );
        assert_eq!(
            err("[recipes.dev]\nprepare = [\"psql\"]\n[recipes.dev.setings]\nx = 1\n"),
            "sqlrs.toml:3: unknown key 'setings' in [recipes.dev] (expected: prepare, engine, settings)"
        );
    }

    #[test]
    fn wrong_types_name_the_file_line_and_path() {
        assert_eq!(
            err("[engine]\nversion = \"16\"\n\n\n\n[recipes.dev]\nprepare = 7\n"),
            "sqlrs.toml:7: recipes.dev.prepare: expected an array of strings, found integer"
        );
        assert_eq!(
            err("[recipes.dev]\nprepare = [\n  \"psql\",\n  3,\n]\n"),
            "sqlrs.toml:4: recipes.dev.prepare[1]: expected a string, found integer"
        );
        assert_eq!(
            err("engine = \"16\"\n"),
            "sqlrs.toml:1: engine: expected a table, found string"
        );
        assert_eq!(
            err("recipes = [1]\n"),
            "sqlrs.toml:1: recipes: expected a table, found array"
        );
        assert_eq!(
            err("[recipes]\ndev = \"psql\"\n"),
            "sqlrs.toml:2: recipes.dev: expected a table, found string"
        );
        assert_eq!(
            err("[engine]\nversion = true\n"),
            "sqlrs.toml:2: engine.version: expected a string or an integer, found boolean"
        );
        assert_eq!(
            err("[engine]\nversion = 16.4\n"),
            "sqlrs.toml:2: engine.version: expected a string or an integer, found float \
             (write a major.minor version as a string, such as \"16.4\")"
        );
        assert_eq!(
            err("[engine]\nsettings = \"fsync=off\"\n"),
            "sqlrs.toml:2: engine.settings: expected a table, found string"
        );
    }

    #[test]
    fn bad_versions_name_the_file_line_and_path() {
        assert_eq!(
            err("[engine]\nversion = \"16.x\"\n"),
            "sqlrs.toml:2: engine.version: invalid engine version '16.x' \
             (expected a major like \"16\" or a major.minor like \"16.4\")"
        );
        assert_eq!(
            err("[recipes.dev]\nprepare = [\"psql\"]\nengine = -1\n"),
            "sqlrs.toml:3: recipes.dev.engine: invalid engine version '-1' \
             (expected a major like \"16\" or a major.minor like \"16.4\")"
        );
    }

    #[test]
    fn prepare_errors_name_the_file_and_line() {
        assert_eq!(
            err("\n[recipes.dev]\nprepare = []\n"),
            "sqlrs.toml:3: recipes.dev.prepare: empty array (expected the prepare kind, \
             one of: psql, lb, cmd, then its arguments)"
        );
        assert_eq!(
            err("[recipes.dev]\nprepare = [\"flyway\", \"migrate\"]\n"),
            "sqlrs.toml:2: recipes.dev.prepare: unknown prepare kind 'flyway' \
             (expected one of: psql, lb, cmd)"
        );
        assert_eq!(
            err("[engine]\nversion = 16\n[recipes.dev]\nengine = \"15\"\n"),
            "sqlrs.toml:3: recipes.dev: missing key 'prepare'"
        );
    }

    #[test]
    fn setting_errors_name_the_file_line_and_key() {
        assert_eq!(
            err("[engine.settings]\nwork_mem = \"4MB\"\n\"work-mem\" = \"4MB\"\n"),
            "sqlrs.toml:3: engine.settings: invalid setting name 'work-mem' \
             (expected [A-Za-z_][A-Za-z0-9_.]*)"
        );
        assert_eq!(
            err("[recipes.dev]\nprepare = [\"psql\"]\n[recipes.dev.settings]\n\"9x\" = 1\n"),
            "sqlrs.toml:4: recipes.dev.settings: invalid setting name '9x' \
             (expected [A-Za-z_][A-Za-z0-9_.]*)"
        );
        assert_eq!(
            err("[engine.settings]\nsearch_path = [\"a\", \"b\"]\n"),
            "sqlrs.toml:2: engine.settings.search_path: expected a string, integer, float or \
             boolean, found array"
        );
        assert_eq!(
            err("[engine.settings]\nfsync = off\n"),
            "sqlrs.toml:2: invalid string: expected `\"`, `'`"
        );
        assert_eq!(
            err("[engine.settings]\nauto_explain.log_min_duration = 0\n"),
            "sqlrs.toml:2: engine.settings.auto_explain: expected a string, integer, float or \
             boolean, found table (quote a dotted setting name: \
             \"auto_explain.log_min_duration\" = ...)"
        );
        assert_eq!(
            err("[engine.settings]\nstart = 1979-05-27\n"),
            "sqlrs.toml:2: engine.settings.start: expected a string, integer, float or boolean, \
             found datetime"
        );
    }

    #[test]
    fn syntax_errors_give_the_line_and_tomls_message() {
        let e = parse("[engine]\nversion = \"16\"\n[engine\n", "sqlrs.toml").unwrap_err();
        let ProjectError::Syntax { file, line, .. } = &e else {
            panic!("not a syntax error: {e}");
        };
        assert_eq!((file.as_str(), *line), ("sqlrs.toml", 3));
        assert!(e.to_string().starts_with("sqlrs.toml:3: "), "{e}");

        let e = parse("[engine]\nversion = 16\nversion = 17\n", "sqlrs.toml").unwrap_err();
        assert!(e.to_string().starts_with("sqlrs.toml:3: "), "{e}");
        assert_eq!(
            err("[engine]\nversion = \"16\"\n[engine\n"),
            "sqlrs.toml:3: invalid table header: expected `.`, `]`"
        );
    }
}
