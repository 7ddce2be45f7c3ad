//! Shell completion. The scripts are small shims that hand the words typed so far to
//! `sqlrs __complete`; what to offer is worked out here from the same clap tree that parses the
//! command line, so completion cannot drift from the grammar. Ids come from the daemon when one
//! runs (it is never started for a completion).

use crate::args::{command, Shell};
use crate::cli::{ID_ANY, ID_INSTANCE, ID_STATE};

/// The script `sqlrs completions SHELL` prints.
pub(crate) fn script(shell: Shell) -> &'static str {
    match shell {
        Shell::Bash => BASH,
        Shell::Zsh => ZSH,
        Shell::Fish => FISH,
    }
}

const BASH: &str = r#"# sqlrs completion for bash. Install:
#   sqlrs completions bash > ~/.local/share/bash-completion/completions/sqlrs
# or add to ~/.bashrc:  source <(sqlrs completions bash)
_sqlrs() {
    local line="${COMP_LINE:0:COMP_POINT}"
    local -a words out
    read -ra words <<< "$line"
    [[ "$line" =~ [[:space:]]$ ]] && words+=("")
    local cur="${words[${#words[@]}-1]}"
    local IFS=$'\n'
    out=($(command "${words[0]}" __complete -- "${words[@]:1}" 2>/dev/null))
    COMPREPLY=()
    case "${out[0]}" in
        :files) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null ;;
        :dirs) COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames 2>/dev/null ;;
        *) local w; for w in "${out[@]}"; do COMPREPLY+=("${w%%$'\t'*}"); done ;;
    esac
    # bash splits words at ':' (COMP_WORDBREAKS): replace only what follows the last one.
    if [[ "$cur" == *:* && "$COMP_WORDBREAKS" == *:* ]]; then
        local colon="${cur%"${cur##*:}"}" i
        for i in "${!COMPREPLY[@]}"; do COMPREPLY[i]="${COMPREPLY[i]#"$colon"}"; done
    fi
}
complete -F _sqlrs sqlrs
"#;

const ZSH: &str = r#"#compdef sqlrs
# sqlrs completion for zsh. Install:
#   sqlrs completions zsh > "${fpath[1]}/_sqlrs"
# or add to ~/.zshrc (after compinit):  source <(sqlrs completions zsh)
_sqlrs() {
    local -a out cands
    local line word desc
    out=("${(@f)$(command ${words[1]} __complete -- "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    case "${out[1]}" in
        :files) _files ;;
        :dirs) _files -/ ;;
        *)
            for line in "${out[@]}"; do
                [[ -z "$line" ]] && continue
                word="${line%%$'\t'*}"
                desc=""
                [[ "$line" == *$'\t'* ]] && desc="${line#*$'\t'}"
                cands+=("${word//:/\\:}:${desc}")
            done
            _describe -t values 'sqlrs' cands
            ;;
    esac
}
if [[ "${funcstack[1]}" == "_sqlrs" ]]; then
    _sqlrs "$@"
else
    compdef _sqlrs sqlrs
fi
"#;

const FISH: &str = r#"# sqlrs completion for fish. Install:
#   sqlrs completions fish > ~/.config/fish/completions/sqlrs.fish
function __sqlrs_complete
    set -l cur (commandline -ct)
    set -l words (commandline -opc) "$cur"
    set -l out ($words[1] __complete -- $words[2..-1] 2>/dev/null)
    switch "$out[1]"
        case :files
            __fish_complete_path "$cur"
        case :dirs
            __fish_complete_directories "$cur"
        case '*'
            printf '%s\n' $out
    end
end
complete -c sqlrs -f -a '(__sqlrs_complete)'
"#;

/// Which ids a word takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdKind {
    State,
    Instance,
    Any,
}

/// What the word being typed may become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Want {
    /// These words (with a description, possibly empty), already filtered by the prefix.
    Words(Vec<(String, String)>),
    /// A file name: the shell's own completion.
    Files,
    /// A directory name.
    Dirs,
    /// Ids of this kind that start with `prefix`, and `also` these words; `home` is a
    /// `--home` typed on the line.
    Ids {
        kind: IdKind,
        prefix: String,
        home: Option<String>,
        also: Vec<(String, String)>,
    },
}

/// The psql arguments a prepare accepts; `true` when the next word is a file.
const PSQL_FLAGS: [(&str, &str); 9] = [
    ("-f", "a script: one step"),
    ("--file", "a script: one step"),
    ("-c", "an SQL command: one step"),
    ("--command", "an SQL command: one step"),
    ("-v", "NAME=VALUE for every step"),
    ("--set", "NAME=VALUE for every step"),
    ("--variable", "NAME=VALUE for every step"),
    ("-1", "every step in one transaction"),
    ("--single-transaction", "every step in one transaction"),
];

/// Where in the line the words so far leave us.
enum Mode {
    /// Flags and positionals of a (sub)command.
    Args,
    /// After `prepare -- `: psql arguments, or a run stage.
    Psql,
    /// After `run -- `: the user's own command.
    Tool,
}

/// What to offer for the last of `words` (the words after `sqlrs`, the last one being typed).
pub(crate) fn want(words: &[String]) -> Want {
    let root = command();
    let (cur, done) = match words.split_last() {
        Some((cur, done)) => (cur.as_str(), done),
        None => ("", &[][..]),
    };
    let mut verb: Option<&clap::Command> = None;
    let mut mode = Mode::Args;
    let mut pending: Option<&clap::Arg> = None;
    let mut pending_psql: Option<&str> = None;
    let mut positionals = 0usize;
    let mut home = None;
    let mut help = false;
    let mut warmup = false;
    for word in done {
        let cmd = verb.unwrap_or(&root);
        if let Some(arg) = pending.take() {
            if arg.get_long() == Some("home") {
                home = Some(word.clone());
            }
            continue;
        }
        match mode {
            Mode::Tool => continue,
            Mode::Psql => {
                if pending_psql.take().is_some() {
                    continue;
                }
                if word == "run" || word.starts_with("run:") {
                    verb = root.find_subcommand(word);
                    mode = Mode::Args;
                    positionals = 0;
                } else if matches!(word.as_str(), "-f" | "--file" | "-c" | "--command")
                    || matches!(word.as_str(), "-v" | "--set" | "--variable")
                {
                    pending_psql = Some(word);
                }
                continue;
            }
            Mode::Args => {}
        }
        if word == "--" {
            let name = verb.map(clap::Command::get_name).unwrap_or_default();
            warmup |= name == "warmup";
            mode = if name.starts_with("prepare") || name == "warmup" {
                Mode::Psql
            } else {
                Mode::Tool
            };
            continue;
        }
        if let Some(flag) = word.strip_prefix("--") {
            if let Some((name, value)) = flag.split_once('=') {
                if name == "home" {
                    home = Some(value.to_owned());
                }
            } else {
                pending = find_flag(cmd, &root, |a| a.get_long() == Some(flag))
                    .filter(|a| a.get_action().takes_values());
            }
            continue;
        }
        if word.len() > 1 && word.starts_with('-') {
            let last = word.chars().last().unwrap_or('-');
            pending = find_flag(cmd, &root, |a| a.get_short() == Some(last))
                .filter(|a| a.get_action().takes_values());
            continue;
        }
        match verb {
            None if word == "help" => help = true,
            None => match root.find_subcommand(word) {
                Some(sub) => verb = Some(sub),
                None => return Want::Words(Vec::new()),
            },
            Some(v) if v.get_name() == "warmup" && word.starts_with("prepare") => {
                warmup = true;
                verb = root.find_subcommand(word);
            }
            Some(_) => positionals += 1,
        }
    }
    if let Some(arg) = pending {
        return value_of(arg, cur, home);
    }
    match mode {
        Mode::Tool => return Want::Files,
        Mode::Psql => {
            if let Some(flag) = pending_psql {
                return if matches!(flag, "-f" | "--file") {
                    Want::Files
                } else {
                    Want::Words(Vec::new())
                };
            }
            let mut out: Vec<(String, String)> = if cur.starts_with('-') {
                words_of(PSQL_FLAGS.iter().map(|(f, d)| (*f, *d)))
            } else if warmup {
                Vec::new()
            } else {
                ["run", "run:psql", "run:pgbench"]
                    .iter()
                    .filter_map(|n| root.find_subcommand(n))
                    .map(describe)
                    .collect()
            };
            out.retain(|(w, _)| w.starts_with(cur));
            return Want::Words(out);
        }
        Mode::Args => {}
    }
    let cmd = verb.unwrap_or(&root);
    let mut out: Vec<(String, String)> = Vec::new();
    if cur.starts_with('-') {
        let mut flags: Vec<&clap::Arg> = cmd.get_arguments().collect();
        if verb.is_some() {
            flags.extend(root.get_arguments().filter(|a| a.is_global_set()));
        }
        for arg in flags
            .into_iter()
            .filter(|a| !a.is_positional() && !a.is_hide_set())
        {
            let about = about_of(arg);
            if let Some(long) = arg.get_long() {
                out.push((format!("--{long}"), about.clone()));
            }
            if let Some(short) = arg.get_short() {
                out.push((format!("-{short}"), about));
            }
        }
        if cmd
            .get_arguments()
            .any(|a| a.is_positional() && a.is_last_set())
        {
            out.push(("--".to_owned(), "then the tool's own arguments".to_owned()));
        }
    } else if verb.is_none() {
        out = visible_subcommands(&root);
        if !help {
            out.push(("help".to_owned(), "Print help for a command".to_owned()));
        }
    } else {
        let positional = cmd
            .get_arguments()
            .filter(|a| a.is_positional() && !a.is_last_set())
            .nth(positionals);
        if cmd.get_name() == "warmup" && positionals == 0 {
            out.push((
                "prepare:psql".to_owned(),
                "warm up the state psql steps make".to_owned(),
            ));
        }
        out.retain(|(w, _)| w.starts_with(cur));
        if let Some(arg) = positional {
            match value_of(arg, cur, home) {
                Want::Words(words) => out.extend(words),
                Want::Ids {
                    kind, prefix, home, ..
                } => {
                    return Want::Ids {
                        kind,
                        prefix,
                        home,
                        also: out,
                    }
                }
                other => return other,
            }
        }
    }
    out.retain(|(w, _)| w.starts_with(cur));
    Want::Words(out)
}

/// What a flag's or positional's value may be.
fn value_of(arg: &clap::Arg, cur: &str, home: Option<String>) -> Want {
    let names = arg.get_value_names().unwrap_or_default();
    let id = match names.first().map(clap::builder::Str::as_str) {
        Some(ID_ANY) => Some(IdKind::Any),
        Some(ID_STATE) => Some(IdKind::State),
        Some(ID_INSTANCE) => Some(IdKind::Instance),
        Some("DIR") => return Want::Dirs,
        _ => None,
    };
    if let Some(kind) = id {
        return Want::Ids {
            kind,
            prefix: cur.to_ascii_lowercase(),
            home,
            also: Vec::new(),
        };
    }
    let mut out: Vec<(String, String)> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| {
            (
                v.get_name().to_owned(),
                v.get_help().map(ToString::to_string).unwrap_or_default(),
            )
        })
        .collect();
    out.retain(|(w, _)| w.starts_with(cur));
    Want::Words(out)
}

fn find_flag<'a>(
    cmd: &'a clap::Command,
    root: &'a clap::Command,
    pred: impl Fn(&clap::Arg) -> bool,
) -> Option<&'a clap::Arg> {
    cmd.get_arguments()
        .chain(root.get_arguments().filter(|a| a.is_global_set()))
        .find(|a| !a.is_positional() && pred(a))
}

fn about_of(arg: &clap::Arg) -> String {
    arg.get_help().map(ToString::to_string).unwrap_or_default()
}

fn describe(cmd: &clap::Command) -> (String, String) {
    (
        cmd.get_name().to_owned(),
        cmd.get_about().map(ToString::to_string).unwrap_or_default(),
    )
}

fn visible_subcommands(root: &clap::Command) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for sub in root.get_subcommands().filter(|s| !s.is_hide_set()) {
        let (name, about) = describe(sub);
        for alias in sub.get_visible_aliases() {
            out.push((alias.to_owned(), about.clone()));
        }
        out.push((name, about));
    }
    out
}

fn words_of<'a>(it: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    it.map(|(w, d)| (w.to_owned(), d.to_owned())).collect()
}

/// The ids of `kind` to offer for `prefix`: twelve hex digits of a state (as `ls` shows them),
/// the whole id of an instance, or the whole id once twelve digits are typed.
pub(crate) fn ids_for(
    kind: IdKind,
    prefix: &str,
    states: &[String],
    instances: &[String],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut add = |ids: &[String], what: &str, short: bool| {
        for id in ids.iter().filter(|id| id.starts_with(prefix)) {
            let shown = if short && prefix.len() < 12 {
                id.chars().take(12).collect()
            } else {
                id.clone()
            };
            out.push((shown, what.to_owned()));
        }
    };
    if matches!(kind, IdKind::State | IdKind::Any) {
        add(states, "state", true);
    }
    if matches!(kind, IdKind::Instance | IdKind::Any) {
        add(instances, "instance", false);
    }
    out
}

/// The lines `sqlrs __complete` prints: a directive for files and directories, else one
/// `word<TAB>description` per candidate.
pub(crate) fn render(want: &Want) -> String {
    match want {
        Want::Files => ":files\n".to_owned(),
        Want::Dirs => ":dirs\n".to_owned(),
        Want::Ids { .. } => String::new(),
        Want::Words(words) => words
            .iter()
            .map(|(w, d)| {
                if d.is_empty() {
                    format!("{w}\n")
                } else {
                    format!("{w}\t{d}\n")
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        let mut w: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        if line.ends_with(' ') || line.is_empty() {
            w.push(String::new());
        }
        w
    }

    fn names(line: &str) -> Vec<String> {
        match want(&words(line)) {
            Want::Words(w) => w.into_iter().map(|(w, _)| w).collect(),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn commands_and_kinds() {
        assert_eq!(
            names("pre"),
            ["prepare", "prepare:psql", "prepare:lb", "prepare:cmd"]
        );
        assert_eq!(names("run:"), ["run:psql", "run:pgbench"]);
        let all = names("");
        for verb in [
            "ls",
            "rm",
            "dsn",
            "pin",
            "warmup",
            "completions",
            "help",
            "status",
        ] {
            assert!(all.iter().any(|n| n == verb), "{verb} in {all:?}");
        }
        assert!(!all.iter().any(|n| n.starts_with("__")), "{all:?}");
        assert_eq!(names("--json st"), ["status"]);
        assert_eq!(names("--home /x st"), ["status"]);
        assert_eq!(names("help pi"), ["pin"]);
    }

    #[test]
    fn flags_of_the_verb_and_the_globals() {
        let flags = names("rm -");
        for f in ["--force", "-f", "--home", "--json", "--output", "-v"] {
            assert!(flags.iter().any(|n| n == f), "{f} in {flags:?}");
        }
        assert_eq!(names("dsn 3f2a9c1e --sc"), ["--scope"]);
        assert_eq!(names("ls --se"), ["--server"]);
        assert_eq!(names("prepare:psql --k"), ["--keep"]);
        assert!(names("prepare:psql -").contains(&"--".to_owned()));
    }

    #[test]
    fn values_of_flags() {
        assert_eq!(names("dsn 3f2a9c1e --scope "), ["ro", "rw"]);
        assert_eq!(names("pin 3f2a9c1e --reason m"), ["main", "manual"]);
        assert_eq!(names("ls --output j"), ["json"]);
        assert_eq!(names("completions "), ["bash", "zsh", "fish"]);
        assert_eq!(want(&words("--home ")), Want::Dirs);
        assert_eq!(
            want(&words("ls --home=/h --o")),
            Want::Words(vec![(
                "--output".into(),
                "Output format; --output json is --json".into()
            )])
        );
    }

    #[test]
    fn ids_where_the_grammar_takes_them() {
        assert_eq!(
            want(&words("--home /h rm 3F")),
            Want::Ids {
                kind: IdKind::Any,
                prefix: "3f".into(),
                home: Some("/h".into()),
                also: Vec::new(),
            }
        );
        assert!(matches!(
            want(&words("pin ")),
            Want::Ids {
                kind: IdKind::State,
                ..
            }
        ));
        assert!(matches!(
            want(&words("run:psql --instance ")),
            Want::Ids {
                kind: IdKind::Instance,
                ..
            }
        ));
        assert!(matches!(
            want(&words("events ")),
            Want::Ids {
                kind: IdKind::State,
                ..
            }
        ));
        // warmup takes a state or a prepare stage.
        assert_eq!(
            want(&words("warmup pre")),
            Want::Ids {
                kind: IdKind::State,
                prefix: "pre".into(),
                home: None,
                also: vec![(
                    "prepare:psql".into(),
                    "warm up the state psql steps make".into()
                )]
            }
        );
        // A second id is not taken.
        assert_eq!(names("rm 3f2a9c1e "), Vec::<String>::new());
    }

    #[test]
    fn psql_arguments_and_the_run_stage() {
        assert_eq!(want(&words("prepare:psql -- -f ")), Want::Files);
        assert_eq!(names("prepare:psql -- -f a.sql -c "), Vec::<String>::new());
        assert_eq!(
            names("prepare:psql -- -f a.sql r"),
            ["run", "run:psql", "run:pgbench"]
        );
        assert_eq!(
            names("prepare -- -f a.sql --s"),
            ["--set", "--single-transaction"]
        );
        // After the run stage starts, its own flags.
        assert_eq!(names("prepare -- -f a.sql run:psql --k"), ["--keep"]);
        assert_eq!(want(&words("prepare -- -f a.sql run -- ")), Want::Files);
        // `-c run` is SQL, not a stage.
        assert_eq!(names("prepare -- -c run --f"), ["--file"]);
        assert_eq!(
            names("warmup --hot prepare:psql -- -f x.sql r"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn ids_are_short_for_states_until_twelve_digits_are_typed() {
        let states = vec!["ab".repeat(32), "cd".repeat(32)];
        let instances = vec!["ab01ab01ab01ab01".to_owned()];
        let got = ids_for(IdKind::Any, "ab", &states, &instances);
        assert_eq!(
            got,
            [
                ("abababababab".to_owned(), "state".to_owned()),
                ("ab01ab01ab01ab01".to_owned(), "instance".to_owned())
            ]
        );
        let got = ids_for(IdKind::State, "abababababab", &states, &instances);
        assert_eq!(got, [("ab".repeat(32), "state".to_owned())]);
        assert!(ids_for(IdKind::Instance, "cd", &states, &instances).is_empty());
    }

    #[test]
    fn rendering() {
        assert_eq!(render(&Want::Files), ":files\n");
        assert_eq!(
            render(&Want::Words(vec![
                ("ls".into(), "List".into()),
                ("rm".into(), String::new())
            ])),
            "ls\tList\nrm\n"
        );
    }
}
