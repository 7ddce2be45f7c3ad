//! Finding the files a psql script pulls in: `\i`, `\include` (relative to psql's working
//! directory), `\ir`, `\include_relative` (relative to the including script).
//!
//! A meta-command counts when it starts a line outside a comment, a quoted string or a
//! dollar-quoted body. Its file name may be plain or in single quotes. A name that uses a psql
//! variable (`:name`, `:'name'`) or a backquoted shell command cannot be known before the run,
//! and is an error rather than a guess.

/// One include meta-command in a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncludeRef {
    /// 1-based line number.
    pub line: usize,
    /// `\ir` / `\include_relative`: relative to the including script's directory.
    pub relative_to_script: bool,
    /// The file name as written (quotes removed).
    pub target: String,
}

/// An include whose file cannot be known before the run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncludeError {
    #[error("line {line}: `{text}` names its file with a psql variable, which is only known when the script runs")]
    Variable { line: usize, text: String },
    #[error("line {line}: `{text}` names its file with a shell command (backquotes)")]
    Backquote { line: usize, text: String },
    #[error("line {line}: `{text}` names no file")]
    NoFile { line: usize, text: String },
}

/// Where the lexer is at the start of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lex {
    Normal,
    /// `/* ... */`, nested to this depth.
    Comment(usize),
    Single,
    Double,
    /// `$tag$ ... $tag$`.
    Dollar(String),
}

/// The include meta-commands of `script`, in order.
pub fn scan(script: &str) -> Result<Vec<IncludeRef>, IncludeError> {
    let mut out = Vec::new();
    let mut lex = Lex::Normal;
    for (n, line) in script.lines().enumerate() {
        let number = n + 1;
        if lex == Lex::Normal {
            let trimmed = line.trim_start();
            if let Some(meta) = trimmed.strip_prefix('\\') {
                if let Some(found) = include(meta, number, trimmed)? {
                    out.push(found);
                }
                // A meta-command line is not SQL: nothing on it changes the lexer's state.
                continue;
            }
        }
        lex = advance(lex, line);
    }
    Ok(out)
}

fn include(meta: &str, line: usize, text: &str) -> Result<Option<IncludeRef>, IncludeError> {
    let name_end = meta
        .find(|c: char| c.is_whitespace() || c == '\'' || c == '\\')
        .unwrap_or(meta.len());
    let relative_to_script = match &meta[..name_end] {
        "i" | "include" => false,
        "ir" | "include_relative" => true,
        _ => return Ok(None),
    };
    let text = text.trim_end().to_owned();
    let arg = meta[name_end..].trim_start();
    let target = if let Some(quoted) = arg.strip_prefix('\'') {
        let mut value = String::new();
        let mut chars = quoted.chars().peekable();
        loop {
            match chars.next() {
                None => break,
                Some('\'') if chars.peek() == Some(&'\'') => {
                    chars.next();
                    value.push('\'');
                }
                Some('\'') => break,
                Some(c) => value.push(c),
            }
        }
        value
    } else {
        let word: String = arg.chars().take_while(|c| !c.is_whitespace()).collect();
        if word.contains('`') {
            return Err(IncludeError::Backquote { line, text });
        }
        if has_variable(&word) {
            return Err(IncludeError::Variable { line, text });
        }
        word
    };
    if target.is_empty() {
        return Err(IncludeError::NoFile { line, text });
    }
    Ok(Some(IncludeRef {
        line,
        relative_to_script,
        target,
    }))
}

/// `:name`, `:'name'`, `:"name"`, `:{?name}`: psql substitutes these in unquoted arguments.
fn has_variable(word: &str) -> bool {
    let bytes = word.as_bytes();
    bytes.windows(2).any(|w| {
        w[0] == b':' && (w[1].is_ascii_alphabetic() || matches!(w[1], b'_' | b'\'' | b'"' | b'{'))
    })
}

/// The lexer's state after `line`, from `lex` at its start.
fn advance(mut lex: Lex, line: &str) -> Lex {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match &mut lex {
            Lex::Normal => {
                if b[i..].starts_with(b"--") {
                    return Lex::Normal;
                } else if b[i..].starts_with(b"/*") {
                    lex = Lex::Comment(1);
                    i += 2;
                    continue;
                } else if b[i] == b'\'' {
                    lex = Lex::Single;
                } else if b[i] == b'"' {
                    lex = Lex::Double;
                } else if b[i] == b'$' {
                    // `$tag$` or `$$`: a tag is an identifier, and `$1` is a parameter.
                    let rest = &line[i + 1..];
                    if let Some(end) = rest.find('$') {
                        let tag = &rest[..end];
                        let is_tag = !tag.starts_with(|c: char| c.is_numeric())
                            && tag.chars().all(|c| c.is_alphanumeric() || c == '_');
                        if is_tag {
                            lex = Lex::Dollar(tag.to_owned());
                            i += end + 2;
                            continue;
                        }
                    }
                }
            }
            Lex::Comment(depth) => {
                if b[i..].starts_with(b"*/") {
                    *depth -= 1;
                    if *depth == 0 {
                        lex = Lex::Normal;
                    }
                    i += 2;
                    continue;
                } else if b[i..].starts_with(b"/*") {
                    *depth += 1;
                    i += 2;
                    continue;
                }
            }
            Lex::Single => {
                if b[i] == b'\'' {
                    lex = Lex::Normal;
                }
            }
            Lex::Double => {
                if b[i] == b'"' {
                    lex = Lex::Normal;
                }
            }
            Lex::Dollar(tag) => {
                let close = format!("${tag}$");
                if line[i..].starts_with(&close) {
                    i += close.len();
                    lex = Lex::Normal;
                    continue;
                }
            }
        }
        i += 1;
    }
    lex
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(script: &str) -> Vec<(usize, bool, String)> {
        scan(script)
            .expect("scans")
            .into_iter()
            .map(|r| (r.line, r.relative_to_script, r.target))
            .collect()
    }

    #[test]
    fn every_form_of_include() {
        let script = "\\i a.sql\n  \\ir sub/b.sql\n\\include c.sql\n\\include_relative 'd e.sql'\n\
                      \\i 'it''s.sql'\nselect 1;\n\\echo hi\n\\if true\n\\set x 1\n";
        assert_eq!(
            refs(script),
            [
                (1, false, "a.sql".into()),
                (2, true, "sub/b.sql".into()),
                (3, false, "c.sql".into()),
                (4, true, "d e.sql".into()),
                (5, false, "it's.sql".into()),
            ]
        );
    }

    #[test]
    fn includes_inside_comments_strings_and_bodies_do_not_count() {
        let script = "/* a comment\n\\i no1.sql\n*/\nselect 'a\n\\i no2.sql\n';\n\
                      create function f() returns int as $body$\n\\i no3.sql\n$body$ language sql;\n\
                      -- \\i no4.sql\n\\i yes.sql\n";
        assert_eq!(refs(script), [(11, false, "yes.sql".into())]);
    }

    #[test]
    fn variables_and_shell_commands_are_refused() {
        assert!(matches!(
            scan("select 1;\n\\i :dir/x.sql\n"),
            Err(IncludeError::Variable { line: 2, .. })
        ));
        assert!(matches!(
            scan("\\ir :'file'\n"),
            Err(IncludeError::Variable { line: 1, .. })
        ));
        assert!(matches!(
            scan("\\i `ls`\n"),
            Err(IncludeError::Backquote { line: 1, .. })
        ));
        assert!(matches!(
            scan("\\i\n"),
            Err(IncludeError::NoFile { line: 1, .. })
        ));
        let e = scan("\\i :dir/x.sql").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 1: `\\i :dir/x.sql` names its file with a psql variable, which is only known \
             when the script runs"
        );
        // A colon that is not a variable is a file name.
        assert_eq!(refs("\\i a:1.sql\n"), [(1, false, "a:1.sql".into())]);
    }
}
