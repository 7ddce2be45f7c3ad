//! Liquibase changelogs: the files a master changelog pulls in (its closure), and the offline
//! plan Liquibase writes for `update-sql` (one CSV row per pending changeset).
//!
//! Paths are '/'-separated and relative to the search root, the directory Liquibase runs in.
//! Nothing here touches a file system: the caller passes closures that read a file and list a
//! directory.

use std::collections::{HashMap, HashSet};
use std::io;

use quick_xml::events::{BytesStart, Event};
use serde_json::Value;

/// One file of a changelog's closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosureFile {
    /// Relative to the search root, normalised.
    pub path: String,
    pub content: Vec<u8>,
}

/// One pending changeset of Liquibase's offline plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChangeset {
    pub id: String,
    pub author: String,
    /// The changelog file as Liquibase names it.
    pub file: String,
    /// As Liquibase writes it, version prefix included (`9:…`).
    pub checksum: String,
    pub description: String,
}

/// Why a changelog's closure or plan could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("{path}: {source}")]
    Root {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {kind} {target}: {source}")]
    Missing {
        file: String,
        kind: RefKind,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {target} is outside the search root")]
    OutsideRoot { file: String, target: String },
    #[error(
        "{file}: {target} uses a changelog parameter, which is only known when Liquibase runs"
    )]
    Parameter { file: String, target: String },
    #[error("{file}: includeAll {target}: no changelog files there")]
    EmptyDir { file: String, target: String },
    #[error("line {line}: {message}")]
    Csv { line: usize, message: String },
}

/// What kind of reference pulled a file in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Include,
    IncludeAll,
    SqlFile,
    LoadData,
    LoadUpdateData,
    CreateProcedure,
    CreateView,
}

impl RefKind {
    fn from_name(name: &str) -> Option<RefKind> {
        Some(match name {
            "include" => RefKind::Include,
            "includeAll" => RefKind::IncludeAll,
            "sqlFile" => RefKind::SqlFile,
            "loadData" => RefKind::LoadData,
            "loadUpdateData" => RefKind::LoadUpdateData,
            "createProcedure" => RefKind::CreateProcedure,
            "createView" => RefKind::CreateView,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            RefKind::Include => "include",
            RefKind::IncludeAll => "includeAll",
            RefKind::SqlFile => "sqlFile",
            RefKind::LoadData => "loadData",
            RefKind::LoadUpdateData => "loadUpdateData",
            RefKind::CreateProcedure => "createProcedure",
            RefKind::CreateView => "createView",
        }
    }

    /// The attribute that names the file or directory.
    fn path_attribute(self) -> &'static str {
        match self {
            RefKind::Include | RefKind::LoadData | RefKind::LoadUpdateData => "file",
            RefKind::IncludeAll
            | RefKind::SqlFile
            | RefKind::CreateProcedure
            | RefKind::CreateView => "path",
        }
    }
}

impl std::fmt::Display for RefKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One reference to another file, as written in a changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileRef {
    kind: RefKind,
    target: String,
    relative_to_changelog: bool,
    /// includeAll only.
    error_if_missing_or_empty: bool,
    /// includeAll only.
    ends_with_filter: Option<String>,
}

impl FileRef {
    fn from_attributes<'a>(
        kind: RefKind,
        mut attribute: impl FnMut(&str) -> Option<&'a str>,
    ) -> Option<FileRef> {
        let target = attribute(kind.path_attribute())?.trim().to_owned();
        let flag = |value: Option<&str>, default: bool| {
            value.map_or(default, |v| v.trim().eq_ignore_ascii_case("true"))
        };
        Some(FileRef {
            kind,
            target,
            relative_to_changelog: flag(attribute("relativeToChangelogFile"), false),
            error_if_missing_or_empty: flag(attribute("errorIfMissingOrEmpty"), true),
            ends_with_filter: attribute("endsWithFilter")
                .map(str::to_owned)
                .filter(|f| !f.is_empty()),
        })
    }
}

/// Extensions Liquibase has a changelog parser for; `includeAll` takes only these.
const CHANGELOG_EXTENSIONS: [&str; 5] = [".xml", ".yaml", ".yml", ".json", ".sql"];

/// The files the changelog `root` pulls in, itself first, then depth-first in document order,
/// each once.
///
/// `read` reads a file and `list_dir` lists every file under a directory, recursively, as
/// paths relative to that directory (both take paths relative to the search root; `""` is the
/// root itself). A file whose content does not parse is kept without following its references:
/// Liquibase reports that error better.
pub fn closure(
    root: &str,
    read: &mut dyn FnMut(&str) -> io::Result<Vec<u8>>,
    list_dir: &mut dyn FnMut(&str) -> io::Result<Vec<String>>,
) -> Result<Vec<ClosureFile>, ChangelogError> {
    let path = resolve(root, "", root, false)?;
    let content = read(&path).map_err(|source| ChangelogError::Root {
        path: root.to_owned(),
        source,
    })?;
    let mut walk = Walk {
        read,
        list_dir,
        files: Vec::new(),
        index: HashMap::new(),
        parsed: HashSet::new(),
    };
    walk.add(path.clone(), content);
    walk.changelog(&path)?;
    Ok(walk.files)
}

struct Walk<'r> {
    read: &'r mut dyn FnMut(&str) -> io::Result<Vec<u8>>,
    list_dir: &'r mut dyn FnMut(&str) -> io::Result<Vec<String>>,
    files: Vec<ClosureFile>,
    index: HashMap<String, usize>,
    /// Changelogs whose references have been followed (or are being followed: a cycle stops).
    parsed: HashSet<String>,
}

impl Walk<'_> {
    fn add(&mut self, path: String, content: Vec<u8>) {
        self.index.insert(path.clone(), self.files.len());
        self.files.push(ClosureFile { path, content });
    }

    /// Reads `target` unless it is already in the closure.
    fn fetch(&mut self, file: &str, kind: RefKind, target: &str) -> Result<(), ChangelogError> {
        if self.index.contains_key(target) {
            return Ok(());
        }
        let content = (self.read)(target).map_err(|source| ChangelogError::Missing {
            file: file.to_owned(),
            kind,
            target: target.to_owned(),
            source,
        })?;
        self.add(target.to_owned(), content);
        Ok(())
    }

    /// Follows the references of the changelog `path`, already in the closure.
    fn changelog(&mut self, path: &str) -> Result<(), ChangelogError> {
        if !self.parsed.insert(path.to_owned()) {
            return Ok(());
        }
        let refs = match self.index.get(path) {
            Some(&i) => references(path, &self.files[i].content),
            None => Vec::new(),
        };
        for r in refs {
            let target = resolve(path, dir_of(path), &r.target, r.relative_to_changelog)?;
            match r.kind {
                RefKind::Include => {
                    self.fetch(path, r.kind, &target)?;
                    self.changelog(&target)?;
                }
                RefKind::IncludeAll => self.include_all(path, &r, &target)?,
                _ => self.fetch(path, r.kind, &target)?,
            }
        }
        Ok(())
    }

    fn include_all(&mut self, file: &str, r: &FileRef, dir: &str) -> Result<(), ChangelogError> {
        let listed = match (self.list_dir)(dir) {
            Ok(listed) => listed,
            Err(_) if !r.error_if_missing_or_empty => return Ok(()),
            Err(source) => {
                return Err(ChangelogError::Missing {
                    file: file.to_owned(),
                    kind: RefKind::IncludeAll,
                    target: dir.to_owned(),
                    source,
                })
            }
        };
        let mut paths: Vec<String> = listed
            .iter()
            .map(|name| join(dir, name))
            .filter(|p| {
                let lower = p.to_ascii_lowercase();
                CHANGELOG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
                    && match &r.ends_with_filter {
                        Some(f) => p.ends_with(f.as_str()),
                        None => true,
                    }
            })
            .collect();
        // Liquibase sorts by the full path, as Java compares strings.
        paths.sort();
        paths.dedup();
        if paths.is_empty() && r.error_if_missing_or_empty {
            return Err(ChangelogError::EmptyDir {
                file: file.to_owned(),
                target: dir.to_owned(),
            });
        }
        for path in paths {
            self.fetch(file, RefKind::IncludeAll, &path)?;
            self.changelog(&path)?;
        }
        Ok(())
    }
}

/// The directory part of `path` ("" at the root).
fn dir_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

fn join(dir: &str, name: &str) -> String {
    let name = name.trim_start_matches('/');
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{}/{name}", dir.trim_end_matches('/'))
    }
}

/// `target` as a normalised path relative to the search root; `file` names the includer in
/// errors.
fn resolve(file: &str, dir: &str, target: &str, relative: bool) -> Result<String, ChangelogError> {
    let outside = || ChangelogError::OutsideRoot {
        file: file.to_owned(),
        target: target.to_owned(),
    };
    if target.contains("${") {
        return Err(ChangelogError::Parameter {
            file: file.to_owned(),
            target: target.to_owned(),
        });
    }
    let written = target.strip_prefix("classpath:").unwrap_or(target);
    let written = written.replace('\\', "/");
    let drive = written.len() >= 2 && written.as_bytes()[1] == b':';
    if written.starts_with('/') || drive {
        return Err(outside());
    }
    let joined = if relative {
        join(dir, &written)
    } else {
        written
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or_else(outside)?;
            }
            _ => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// The references of the changelog `path`, chosen by its extension; none if it does not parse.
fn references(path: &str, content: &[u8]) -> Vec<FileRef> {
    let Ok(text) = std::str::from_utf8(content) else {
        return Vec::new();
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lower = path.to_ascii_lowercase();
    let parsed = if lower.ends_with(".xml") {
        xml_references(text)
    } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
        serde_norway::from_str::<Value>(text)
            .ok()
            .map(|v| value_references(&v))
    } else if lower.ends_with(".json") {
        serde_json::from_str::<Value>(text)
            .ok()
            .map(|v| value_references(&v))
    } else if lower.ends_with(".sql") {
        Some(formatted_sql_references(text))
    } else {
        None
    };
    parsed.unwrap_or_default()
}

/// `None` if the document is not well-formed.
fn xml_references(text: &str) -> Option<Vec<FileRef>> {
    let mut reader = quick_xml::Reader::from_str(text);
    let mut out = Vec::new();
    let mut depth = 0usize;
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => {
                depth += 1;
                out.extend(xml_reference(&e)?);
            }
            Event::Empty(e) => out.extend(xml_reference(&e)?),
            Event::End(_) => depth = depth.checked_sub(1)?,
            Event::Eof => break,
            _ => {}
        }
    }
    (depth == 0).then_some(out)
}

/// `None` if an attribute is malformed; `Some(None)` if the element references nothing.
fn xml_reference(e: &BytesStart<'_>) -> Option<Option<FileRef>> {
    let name = e.local_name();
    let Some(kind) = std::str::from_utf8(name.as_ref())
        .ok()
        .and_then(RefKind::from_name)
    else {
        return Some(None);
    };
    let mut attributes = Vec::new();
    for a in e.attributes() {
        let a = a.ok()?;
        let key = std::str::from_utf8(a.key.local_name().as_ref())
            .ok()?
            .to_owned();
        attributes.push((key, a.unescape_value().ok()?.into_owned()));
    }
    Some(FileRef::from_attributes(kind, |k| {
        attributes
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }))
}

/// References anywhere in a YAML or JSON changelog: `{include: {file: …}}`,
/// `{sqlFile: {path: …}}` and so on, in lists in document order (map keys sorted, so the
/// order does not depend on how the map was built).
fn value_references(value: &Value) -> Vec<FileRef> {
    let mut out = Vec::new();
    collect_value_references(value, &mut out);
    out
}

fn collect_value_references(value: &Value, out: &mut Vec<FileRef>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| collect_value_references(v, out)),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for key in keys {
                let v = &map[key.as_str()];
                match (RefKind::from_name(key), v) {
                    (Some(kind), Value::Object(attributes)) => {
                        out.extend(FileRef::from_attributes(kind, |k| {
                            attributes.get(k).and_then(scalar)
                        }));
                    }
                    _ => collect_value_references(v, out),
                }
            }
        }
        _ => {}
    }
}

/// A YAML/JSON scalar as text (`true` and `"true"` alike).
fn scalar(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Bool(true) => Some("true"),
        Value::Bool(false) => Some("false"),
        _ => None,
    }
}

/// `--include file:X` and `--includeAll path:X` lines of a formatted SQL changelog; a plain
/// SQL file pulls in nothing.
fn formatted_sql_references(text: &str) -> Vec<FileRef> {
    let mut lines = text.lines();
    let formatted = lines.next().is_some_and(|first| {
        first.trim().strip_prefix("--").is_some_and(|rest| {
            rest.trim_start()
                .to_ascii_lowercase()
                .starts_with("liquibase formatted")
        })
    });
    if !formatted {
        return Vec::new();
    }
    let mut out = Vec::new();
    for line in lines {
        let Some(rest) = line.trim_start().strip_prefix("--") else {
            continue;
        };
        let rest = rest.trim_start();
        let Some(space) = rest.find(char::is_whitespace) else {
            continue;
        };
        let kind = match rest[..space].to_ascii_lowercase().as_str() {
            "include" => RefKind::Include,
            "includeall" => RefKind::IncludeAll,
            _ => continue,
        };
        let attributes: Vec<(String, &str)> = rest[space..]
            .split_whitespace()
            .filter_map(|t| t.split_once(':'))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        out.extend(FileRef::from_attributes(kind, |k| {
            let k = k.to_ascii_lowercase();
            attributes
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| *v)
        }));
    }
    out
}

/// The pending changesets of the CSV Liquibase writes for an offline `update-sql`, in file
/// order. Columns are found by their header names.
pub fn parse_plan_csv(text: &str) -> Result<Vec<PlannedChangeset>, ChangelogError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = csv_records(text)?.into_iter();
    let Some((_, header)) = records.next() else {
        return Err(ChangelogError::Csv {
            line: 1,
            message: "no header".to_owned(),
        });
    };
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| ChangelogError::Csv {
                line: 1,
                message: format!("no {name} column"),
            })
    };
    let [id, author, file, checksum, description] =
        ["ID", "AUTHOR", "FILENAME", "MD5SUM", "DESCRIPTION"].map(column);
    let (id, author, file, checksum, description) = (id?, author?, file?, checksum?, description?);
    let mut out = Vec::new();
    for (line, fields) in records {
        if fields.len() != header.len() {
            return Err(ChangelogError::Csv {
                line,
                message: format!("{} fields, the header has {}", fields.len(), header.len()),
            });
        }
        out.push(PlannedChangeset {
            id: fields[id].clone(),
            author: fields[author].clone(),
            file: fields[file].clone(),
            checksum: fields[checksum].clone(),
            description: fields[description].clone(),
        });
    }
    Ok(out)
}

/// RFC 4180 records with the 1-based line each starts on; blank lines are skipped.
fn csv_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, ChangelogError> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        if matches!(chars.peek(), Some('\n' | '\r')) {
            if chars.next() == Some('\n') {
                line += 1;
            }
            continue;
        }
        let mut fields = Vec::new();
        loop {
            let mut field = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        None => {
                            return Err(ChangelogError::Csv {
                                line: start,
                                message: "unterminated quoted field".to_owned(),
                            })
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if matches!(c, ',' | '\n' | '\r') {
                        break;
                    }
                    if c == '"' {
                        return Err(ChangelogError::Csv {
                            line,
                            message: "a quote inside an unquoted field".to_owned(),
                        });
                    }
                    field.push(c);
                    chars.next();
                }
            }
            fields.push(field);
            match chars.next() {
                Some(',') => continue,
                None | Some('\n') => {
                    line += 1;
                    break;
                }
                Some('\r') if matches!(chars.peek(), None | Some('\n')) => {
                    chars.next();
                    line += 1;
                    break;
                }
                Some(c) => {
                    return Err(ChangelogError::Csv {
                        line,
                        message: format!("`{c}` after a quoted field"),
                    })
                }
            }
        }
        records.push((start, fields));
    }
    Ok(records)
}

/// The SQL of each changeset in `update-sql` output, keyed `FILE::ID::AUTHOR` as Liquibase
/// writes it in its `-- Changeset` comment; the header before the first changeset is dropped.
pub fn split_update_sql(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    let finish = |current: &mut Option<(String, Vec<&str>)>, out: &mut Vec<(String, String)>| {
        if let Some((key, lines)) = current.take() {
            out.push((key, lines.join("\n").trim().to_owned()));
        }
    };
    for line in text.lines() {
        if let Some(key) = line.strip_prefix("-- Changeset ") {
            finish(&mut current, &mut out);
            current = Some((key.trim().to_owned(), Vec::new()));
        } else if line.trim_end() == "-- Release Database Lock" {
            finish(&mut current, &mut out);
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    finish(&mut current, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const XML_HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<databaseChangeLog xmlns="http://www.liquibase.org/xml/ns/dbchangelog">"#;

    fn xml(body: &str) -> String {
        format!("{XML_HEAD}\n{body}\n</databaseChangeLog>\n")
    }

    /// Runs `closure` over an in-memory tree; returns the paths, or the error's message.
    fn run(files: &[(&str, &str)], root: &str) -> Result<Vec<String>, String> {
        let map: BTreeMap<String, Vec<u8>> = files
            .iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect();
        let mut read = |p: &str| {
            map.get(p)
                .cloned()
                .ok_or_else(|| io::Error::from_raw_os_error(2))
        };
        let mut list = |dir: &str| {
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let found: Vec<String> = map
                .keys()
                .filter_map(|p| p.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            if found.is_empty() {
                Err(io::Error::from_raw_os_error(2))
            } else {
                Ok(found)
            }
        };
        let out = closure(root, &mut read, &mut list).map_err(|e| e.to_string())?;
        for f in &out {
            assert_eq!(f.content, map[&f.path], "{}", f.path);
        }
        Ok(out.into_iter().map(|f| f.path).collect())
    }

    #[test]
    fn xml_includes_relative_and_root_relative_with_leaves() {
        let master = xml(r#"
  <include file="sub/a.xml" relativeToChangelogFile="true"/>
  <lb:include xmlns:lb="http://www.liquibase.org/xml/ns/dbchangelog" file="classpath:other/b.yaml"/>
  <changeSet id="1" author="x">
    <sqlFile path="../sql/one.sql" relativeToChangelogFile="true"/>
    <loadData tableName="t" file="data/t.csv"/>
    <createView viewName="v" path="v.sql" relativeToChangelogFile="true"/>
    <createView viewName="w">select 1</createView>
    <rollback><sqlFile path="sql/undo.sql"/></rollback>
  </changeSet>"#);
        let a = xml(
            r#"<changeSet id="2" author="x"><createProcedure path="./p.sql" relativeToChangelogFile="TRUE"/></changeSet>"#,
        );
        let files = [
            ("db/master.xml", master.as_str()),
            ("db/sub/a.xml", a.as_str()),
            ("db/sub/p.sql", "create procedure p() ..."),
            ("other/b.yaml", "databaseChangeLog: []\n"),
            ("sql/one.sql", "select 1;"),
            ("sql/undo.sql", "select 2;"),
            ("data/t.csv", "id\n1\n"),
            ("db/v.sql", "select 3"),
        ];
        assert_eq!(
            run(&files, "./db//master.xml").unwrap(),
            [
                "db/master.xml",
                "db/sub/a.xml",
                "db/sub/p.sql",
                "other/b.yaml",
                "sql/one.sql",
                "data/t.csv",
                "db/v.sql",
                "sql/undo.sql",
            ]
        );
    }

    #[test]
    fn yaml_master() {
        let master = "databaseChangeLog:
  - include:
      file: inc/one.xml
      relativeToChangelogFile: true
  - includeAll:
      path: all/
  - changeSet:
      id: 1
      author: x
      changes:
        - sqlFile:
            path: s.sql
            relativeToChangelogFile: 'true'
        - loadUpdateData:
            file: data.csv
            tableName: t
";
        let files = [
            ("y/master.yaml", master),
            ("y/inc/one.xml", &*xml("")),
            ("all/2.sql", "select 2;"),
            ("all/1.json", r#"{"databaseChangeLog": []}"#),
            ("all/notes.txt", "skipped"),
            ("y/s.sql", "select 1;"),
            ("data.csv", "id\n"),
        ];
        assert_eq!(
            run(&files, "y/master.yaml").unwrap(),
            [
                "y/master.yaml",
                "y/inc/one.xml",
                "all/1.json",
                "all/2.sql",
                "y/s.sql",
                "data.csv",
            ]
        );
    }

    #[test]
    fn json_master() {
        let master = r#"{"databaseChangeLog": [
  {"include": {"file": "b.xml"}},
  {"include": {"file": "a.yml"}},
  {"changeSet": {"id": "1", "author": "x", "changes": [
     {"sqlFile": {"path": "j/s.sql", "relativeToChangelogFile": true}},
     {"loadData": {"file": "d.csv", "relativeToChangelogFile": false}}]}}
]}"#;
        let files = [
            ("j/m.json", master),
            ("b.xml", &*xml("")),
            ("a.yml", "databaseChangeLog: []"),
            ("j/j/s.sql", "select 1;"),
            ("d.csv", "id\n"),
        ];
        assert_eq!(
            run(&files, "j/m.json").unwrap(),
            ["j/m.json", "b.xml", "a.yml", "j/j/s.sql", "d.csv"]
        );
    }

    #[test]
    fn formatted_sql_master() {
        let master = "-- liquibase formatted sql
--changeset x:1
select 1;
--include file:more.sql relativeToChangelogFile:true
--includeAll path:all/
-- not an include
";
        let files = [
            ("f/m.sql", master),
            (
                "f/more.sql",
                "--liquibase formatted sql\n--include file:plain.sql\n",
            ),
            ("plain.sql", "--include file:never.sql\nselect 1;"),
            ("all/a.sql", "select 1;"),
        ];
        assert_eq!(
            run(&files, "f/m.sql").unwrap(),
            ["f/m.sql", "f/more.sql", "plain.sql", "all/a.sql"]
        );
        // A plain SQL file pulls nothing in.
        assert_eq!(run(&files, "plain.sql").unwrap(), ["plain.sql"]);
    }

    #[test]
    fn include_all_sorts_by_full_path_and_recurses() {
        // The order Liquibase 4.28 ran them in: Java string order of the whole path.
        let master = xml(r#"<includeAll path="all"/>"#);
        let files = [
            ("m.xml", master.as_str()),
            ("all/b.sql", ""),
            ("all/sub/z.sql", ""),
            ("all/b/a.sql", ""),
            ("all/a_b.sql", ""),
            ("all/B.sql", ""),
            ("all/a-b.sql", ""),
            ("all/a.sql", ""),
            ("all/readme.txt", ""),
            ("all/c.xml", &*xml(r#"<include file="x.sql"/>"#)),
            ("x.sql", ""),
        ];
        assert_eq!(
            run(&files, "m.xml").unwrap(),
            [
                "m.xml",
                "all/B.sql",
                "all/a-b.sql",
                "all/a.sql",
                "all/a_b.sql",
                "all/b.sql",
                "all/b/a.sql",
                "all/c.xml",
                "x.sql",
                "all/sub/z.sql",
            ]
        );
        let filtered = xml(r#"<includeAll path="all/" endsWithFilter=".xml"/>"#);
        assert_eq!(
            run(
                &[
                    ("m.xml", &filtered),
                    ("all/c.xml", &xml("")),
                    ("all/a.sql", "")
                ],
                "m.xml"
            )
            .unwrap(),
            ["m.xml", "all/c.xml"]
        );
    }

    #[test]
    fn include_all_missing_or_empty() {
        let m = xml(r#"<includeAll path="none/"/>"#);
        assert_eq!(
            run(&[("m.xml", &m)], "m.xml").unwrap_err(),
            "m.xml: includeAll none: No such file or directory (os error 2)"
        );
        let m = xml(r#"<includeAll path="d/"/>"#);
        assert_eq!(
            run(&[("m.xml", &m), ("d/x.txt", "")], "m.xml").unwrap_err(),
            "m.xml: includeAll d: no changelog files there"
        );
        let m = xml(r#"<includeAll path="none/" errorIfMissingOrEmpty="false"/>"#);
        assert_eq!(run(&[("m.xml", &m)], "m.xml").unwrap(), ["m.xml"]);
    }

    #[test]
    fn missing_include_names_the_includer() {
        let m = xml(r#"<include file="missing.xml" relativeToChangelogFile="true"/>"#);
        assert_eq!(
            run(&[("db/changelog.xml", &m)], "db/changelog.xml").unwrap_err(),
            "db/changelog.xml: include db/missing.xml: No such file or directory (os error 2)"
        );
        let m = xml(r#"<changeSet id="1" author="x"><sqlFile path="gone.sql"/></changeSet>"#);
        assert_eq!(
            run(&[("m.xml", &m)], "m.xml").unwrap_err(),
            "m.xml: sqlFile gone.sql: No such file or directory (os error 2)"
        );
        assert_eq!(
            run(&[], "nope.xml").unwrap_err(),
            "nope.xml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn paths_outside_the_root_are_errors() {
        let m = xml(r#"<include file="../../x.xml" relativeToChangelogFile="true"/>"#);
        assert_eq!(
            run(&[("db/m.xml", &m)], "db/m.xml").unwrap_err(),
            "db/m.xml: ../../x.xml is outside the search root"
        );
        let m = xml(r#"<include file="/etc/x.xml"/>"#);
        assert!(matches!(
            closure("m.xml", &mut |_| Ok(m.clone().into_bytes()), &mut |_| Ok(vec![])),
            Err(ChangelogError::OutsideRoot { file, target }) if file == "m.xml" && target == "/etc/x.xml"
        ));
        assert!(run(&[], "../m.xml").is_err());
        // `..` that stays inside is fine.
        let m = xml(r#"<include file="../x.xml" relativeToChangelogFile="true"/>"#);
        assert_eq!(
            run(&[("db/m.xml", &m), ("x.xml", &xml(""))], "db/m.xml").unwrap(),
            ["db/m.xml", "x.xml"]
        );
        let m = xml(r#"<include file="${dir}/x.xml"/>"#);
        assert!(run(&[("m.xml", &m)], "m.xml")
            .unwrap_err()
            .contains("changelog parameter"));
    }

    #[test]
    fn cycles_end() {
        let a = xml(r#"<include file="b.yaml"/><include file="a.xml"/>"#);
        let b = "databaseChangeLog:\n  - include: {file: a.xml}\n  - includeAll: {path: d}\n";
        let files = [("a.xml", a.as_str()), ("b.yaml", b), ("d/b.yaml", b)];
        assert_eq!(
            run(&files, "a.xml").unwrap(),
            ["a.xml", "b.yaml", "d/b.yaml"]
        );
    }

    #[test]
    fn unparseable_files_are_kept_not_followed() {
        let m =
            xml(r#"<include file="bad.xml"/><include file="bad.yaml"/><include file="bad.json"/>"#);
        let files = [
            ("m.xml", m.as_str()),
            ("bad.xml", r#"<databaseChangeLog><include file="x.xml"/>"#),
            (
                "bad.yaml",
                "databaseChangeLog:\n  - include: {file: x.xml\n  -: ]",
            ),
            (
                "bad.json",
                r#"{"databaseChangeLog": [{"include": {"file": "x.xml"}}"#,
            ),
        ];
        assert_eq!(
            run(&files, "m.xml").unwrap(),
            ["m.xml", "bad.xml", "bad.yaml", "bad.json"]
        );
    }

    #[test]
    fn a_leaf_later_included_as_a_changelog_is_followed() {
        let m = xml(
            r#"<changeSet id="1" author="x"><sqlFile path="f.sql"/></changeSet><include file="f.sql"/>"#,
        );
        let files = [
            ("m.xml", m.as_str()),
            ("f.sql", "--liquibase formatted sql\n--include file:g.sql\n"),
            ("g.sql", ""),
        ];
        assert_eq!(run(&files, "m.xml").unwrap(), ["m.xml", "f.sql", "g.sql"]);
    }

    const PLAN: &str = r#""ID","AUTHOR","FILENAME","DATEEXECUTED","ORDEREXECUTED","EXECTYPE","MD5SUM","DESCRIPTION","COMMENTS","TAG","LIQUIBASE","CONTEXTS","LABELS","DEPLOYMENT_ID"
"1","alice","changelog.xml","2026-11-29T00:19:18.434","2","EXECUTED","9:4540d4f5693b57b1bf9dc442f82d52fc","createTable tableName=t","","","4.28.0","()","","5911558370"
"2","bob","changelog.xml","2026-11-29T00:19:18.463","4","EXECUTED","9:7eccd65c09ebd6b3a07a95c0437b7fd1","sqlFile path=s/two.sql","","","4.28.0","()","","5911558370"
"3","carol","more.yaml","2026-11-29T00:19:18.469","6","EXECUTED","9:4ba53175fc9fe0fb0910d916d8d36522","sql",,"","4.28.0","()","","5911558370"
"#;

    fn planned(
        id: &str,
        author: &str,
        file: &str,
        checksum: &str,
        description: &str,
    ) -> PlannedChangeset {
        PlannedChangeset {
            id: id.into(),
            author: author.into(),
            file: file.into(),
            checksum: checksum.into(),
            description: description.into(),
        }
    }

    #[test]
    fn plan_csv_as_liquibase_writes_it() {
        assert_eq!(
            parse_plan_csv(PLAN).unwrap(),
            [
                planned(
                    "1",
                    "alice",
                    "changelog.xml",
                    "9:4540d4f5693b57b1bf9dc442f82d52fc",
                    "createTable tableName=t"
                ),
                planned(
                    "2",
                    "bob",
                    "changelog.xml",
                    "9:7eccd65c09ebd6b3a07a95c0437b7fd1",
                    "sqlFile path=s/two.sql"
                ),
                planned(
                    "3",
                    "carol",
                    "more.yaml",
                    "9:4ba53175fc9fe0fb0910d916d8d36522",
                    "sql"
                ),
            ]
        );
        assert_eq!(parse_plan_csv(PLAN.lines().next().unwrap()).unwrap(), []);
    }

    #[test]
    fn plan_csv_quoting_and_column_order() {
        let text = "DESCRIPTION,MD5SUM,FILENAME,AUTHOR,ID\r\n\"say \"\"hi\"\", then\r\nbye\",9:a,\"a,b.xml\",x,\"\"\r\n\n,9:b,f.sql,\"\",7";
        assert_eq!(
            parse_plan_csv(text).unwrap(),
            [
                planned("", "x", "a,b.xml", "9:a", "say \"hi\", then\r\nbye"),
                planned("7", "", "f.sql", "9:b", ""),
            ]
        );
    }

    #[test]
    fn plan_csv_errors_name_the_line() {
        let no_id = "AUTHOR,FILENAME,MD5SUM,DESCRIPTION\nx,f,9:a,d\n";
        assert_eq!(
            parse_plan_csv(no_id).unwrap_err().to_string(),
            "line 1: no ID column"
        );
        let header = "ID,AUTHOR,FILENAME,MD5SUM,DESCRIPTION\n";
        let short = format!("{header}1,x,f,9:a,d\n2,x,f\n");
        assert_eq!(
            parse_plan_csv(&short).unwrap_err().to_string(),
            "line 3: 3 fields, the header has 5"
        );
        let multi = format!("{header}1,x,f,9:a,\"two\nlines\"\n2,x,\"f\"g,9:b,d\n");
        assert_eq!(
            parse_plan_csv(&multi).unwrap_err().to_string(),
            "line 4: `g` after a quoted field"
        );
        let open = format!("{header}1,x,f,9:a,\"d\n");
        assert_eq!(
            parse_plan_csv(&open).unwrap_err().to_string(),
            "line 2: unterminated quoted field"
        );
        let stray = format!("{header}1,x,f\"g,9:a,d\n");
        assert!(parse_plan_csv(&stray)
            .unwrap_err()
            .to_string()
            .starts_with("line 2:"));
        assert!(parse_plan_csv("").is_err());
    }

    #[test]
    fn update_sql_sections() {
        let text = "-- *****
-- Update Database Script
-- Change Log: master.xml

-- Changeset master.xml::1::alice
CREATE TABLE t (id INTEGER);

INSERT INTO databasechangelog (ID) VALUES ('1');

-- Changeset all/b.sql::x::y
select '-- Changeset not::a::header';

-- Release Database Lock
UPDATE databasechangeloglock SET LOCKED = FALSE;
";
        assert_eq!(
            split_update_sql(text),
            [
                (
                    "master.xml::1::alice".to_owned(),
                    "CREATE TABLE t (id INTEGER);\n\nINSERT INTO databasechangelog (ID) VALUES ('1');".to_owned()
                ),
                (
                    "all/b.sql::x::y".to_owned(),
                    "select '-- Changeset not::a::header';".to_owned()
                ),
            ]
        );
        assert_eq!(split_update_sql("-- header only\n"), []);
    }
}
