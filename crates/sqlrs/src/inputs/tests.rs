use std::fs;

use taidon_core::identity::content_sha256;

use super::*;

fn psql(files: &[&str]) -> PsqlArgs {
    PsqlArgs {
        inputs: files.iter().map(|f| Input::File((*f).into())).collect(),
        ..PsqlArgs::default()
    }
}

/// A tree of files under a temp dir, and the cwd inside it.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        Self { dir }
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn collect(&self, cwd: &str, args: &PsqlArgs) -> Result<Collected, InputError> {
        let mut cache = HashCache::default();
        collect(args, &self.at(cwd), &mut cache, &mut io::empty())
    }
}

fn file_input(step: &Step) -> (&str, &str, &str, &[Included]) {
    let Step::Psql(p) = step else {
        panic!("not psql")
    };
    match &p.input {
        PsqlInput::File {
            path,
            sha256,
            workdir,
            includes,
        } => (path, sha256, workdir, includes),
        PsqlInput::Command { .. } => panic!("a command"),
    }
}

#[test]
fn a_closure_follows_psqls_rules_for_relative_paths() {
    let t = Tree::new(&[
        ("app/db/main.sql", "\\i lib/a.sql\n\\ir sub/b.sql\n"),
        ("app/lib/a.sql", "\\ir c.sql\n"),
        ("app/lib/c.sql", "select 'c';\n"),
        ("app/db/sub/b.sql", "\\i lib/c.sql\n"),
        ("shared/x.sql", "select 'x';\n"),
    ]);
    let got = t
        .collect("app", &psql(&["db/main.sql", "../shared/x.sql"]))
        .unwrap();
    let (path, sha, workdir, includes) = file_input(&got.steps[0]);
    // The root is the common ancestor of the cwd and every file: the tree's top.
    assert_eq!((path, workdir), ("db/main.sql", "app"));
    assert_eq!(sha, content_sha256(b"\\i lib/a.sql\n\\ir sub/b.sql\n"));
    let order: Vec<&str> = includes.iter().map(|i| i.path.as_str()).collect();
    // \i is relative to the cwd, \ir to the including script; c.sql is read twice.
    assert_eq!(
        order,
        [
            "app/lib/a.sql",
            "app/lib/c.sql",
            "app/db/sub/b.sql",
            "app/lib/c.sql"
        ]
    );
    let (path, _, workdir, includes) = file_input(&got.steps[1]);
    assert_eq!((path, workdir), ("../shared/x.sql", "app"));
    assert!(includes.is_empty());
    // Every distinct content is one blob.
    assert_eq!(got.blobs.len(), 5);
    let Step::Psql(p) = &got.steps[0] else {
        panic!("not psql")
    };
    let files = p.input.files();
    assert_eq!(files[0].0, "app/db/main.sql");
}

#[test]
fn editing_an_included_file_changes_the_state() {
    let t = Tree::new(&[("main.sql", "\\i inc.sql\n"), ("inc.sql", "select 1;\n")]);
    let id = |t: &Tree| {
        let got = t.collect("", &psql(&["main.sql"])).unwrap();
        let engine = taidon_core::EngineFingerprint {
            major: 15,
            minor: 18,
            initdb: taidon_core::InitdbOptions::default(),
            settings: Default::default(),
        };
        taidon_core::plan::chain(&engine, &got.steps).head()
    };
    let before = id(&t);
    assert_eq!(id(&t), before);
    fs::write(t.at("inc.sql"), "select 2;\n").unwrap();
    assert_ne!(id(&t), before);
}

#[test]
fn a_missing_include_names_the_including_file_and_line() {
    let t = Tree::new(&[("db/main.sql", "select 1;\n\\ir gone.sql\n")]);
    let e = t.collect("", &psql(&["db/main.sql"])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "db/main.sql:2: \\ir gone.sql: No such file or directory (os error 2)"
    );
    let e = t.collect("", &psql(&["nope.sql"])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot read nope.sql: No such file or directory (os error 2)"
    );
}

#[test]
fn a_cycle_is_named() {
    let t = Tree::new(&[
        ("a.sql", "\\i b.sql\n"),
        ("b.sql", "\\ir sub/../c.sql\n"),
        ("c.sql", "\\i a.sql\n"),
    ]);
    let e = t.collect("", &psql(&["a.sql"])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "include cycle: a.sql -> b.sql -> c.sql -> a.sql"
    );
}

#[test]
fn variables_absolute_paths_and_includes_in_commands_are_refused() {
    let t = Tree::new(&[
        ("v.sql", "\\set d lib\n\\i :d/x.sql\n"),
        ("abs.sql", "\\i /etc/x.sql\n"),
    ]);
    let e = t.collect("", &psql(&["v.sql"])).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("v.sql: line 2: `\\i :d/x.sql` names its file with a psql variable"),
        "{e}"
    );
    let e = t.collect("", &psql(&["abs.sql"])).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("abs.sql:1: \\i /etc/x.sql: an absolute path cannot travel"),
        "{e}"
    );
    let args = PsqlArgs {
        inputs: vec![Input::Command("\\i v.sql".into())],
        ..PsqlArgs::default()
    };
    let e = t.collect("", &args).unwrap_err();
    assert!(matches!(e, InputError::CommandInclude(_)), "{e}");
}

#[test]
fn stdin_is_a_script_once() {
    let t = Tree::new(&[("inc.sql", "select 1;\n")]);
    let mut cache = HashCache::default();
    let mut stdin: &[u8] = b"\\i inc.sql\n";
    let got = collect(&psql(&["-"]), t.dir.path(), &mut cache, &mut stdin).unwrap();
    let (path, sha, _, includes) = file_input(&got.steps[0]);
    assert_eq!(sha, content_sha256(b"\\i inc.sql\n"));
    assert_eq!(path, format!(".sqlrs-stdin-{}.sql", &sha[..12]));
    assert_eq!(includes.len(), 1);
    assert!(matches!(got.blobs.get(sha), Some(BlobSource::Bytes(b)) if b == b"\\i inc.sql\n"));
    let e = collect(
        &psql(&["-", "-"]),
        t.dir.path(),
        &mut cache,
        &mut io::empty(),
    )
    .unwrap_err();
    assert!(matches!(e, InputError::StdinTwice), "{e}");
}

#[test]
fn unchanged_files_are_not_hashed_again() {
    let t = Tree::new(&[("main.sql", "\\i inc.sql\n"), ("inc.sql", "select 1;\n")]);
    let cache_dir = t.at("cache");
    let mut cache = HashCache {
        file: Some(cache_dir.join("hashes.json")),
        ..HashCache::default()
    };
    collect(
        &psql(&["main.sql"]),
        t.dir.path(),
        &mut cache,
        &mut io::empty(),
    )
    .unwrap();
    assert_eq!(cache.hashed, 2);
    cache.save();
    let mut again = HashCache {
        file: Some(cache_dir.join("hashes.json")),
        entries: serde_json::from_slice(&fs::read(cache_dir.join("hashes.json")).unwrap()).unwrap(),
        ..HashCache::default()
    };
    let first = collect(
        &psql(&["main.sql"]),
        t.dir.path(),
        &mut again,
        &mut io::empty(),
    )
    .unwrap();
    assert_eq!(again.hashed, 0, "nothing changed");
    // A changed file (new size, new mtime) is read again, and only it.
    fs::write(t.at("inc.sql"), "select 22;\n").unwrap();
    let second = collect(
        &psql(&["main.sql"]),
        t.dir.path(),
        &mut again,
        &mut io::empty(),
    )
    .unwrap();
    assert_eq!(again.hashed, 1);
    assert_ne!(first.steps, second.steps);
}

#[test]
fn paths_are_normalized_and_made_relative() {
    assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    assert_eq!(
        relative(Path::new("/a/b"), Path::new("/a/c/d.sql")),
        "../c/d.sql"
    );
    assert_eq!(relative(Path::new("/a"), Path::new("/a/d.sql")), "d.sql");
    assert_eq!(relative(Path::new("/a"), Path::new("/a")), "");
    assert_eq!(
        common_root([Path::new("/a/b/c"), Path::new("/a/b/d"), Path::new("/a/b")]),
        PathBuf::from("/a/b")
    );
}

/// Figures for bench/inputs.py: a chain of 1,000 included files hashed with an empty cache,
/// then again with the cache (nothing changed), then after one file changed.
#[test]
#[ignore = "a benchmark: bench/inputs.py runs it in release mode"]
fn bench_closure_of_a_thousand_includes() {
    const N: usize = 1000;
    let t = Tree::new(&[]);
    for i in 0..N {
        let body = if i + 1 < N {
            format!(
                "-- file {i}\ncreate table t{i} (x int);\n\\ir f{}.sql\n",
                i + 1
            )
        } else {
            format!("create table t{i} (x int);\n")
        };
        fs::write(t.at(&format!("f{i}.sql")), body).unwrap();
    }
    let cache_file = t.at("cache/hashes.json");
    let time = |cache: &mut HashCache| {
        let started = std::time::Instant::now();
        let got = collect(&psql(&["f0.sql"]), t.dir.path(), cache, &mut io::empty()).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(file_input(&got.steps[0]).3.len(), N - 1);
        elapsed
    };
    let mut cold = HashCache {
        file: Some(cache_file.clone()),
        ..HashCache::default()
    };
    let first = time(&mut cold);
    assert_eq!(cold.hashed, N);
    cold.save();
    let load = || HashCache {
        file: Some(cache_file.clone()),
        entries: serde_json::from_slice(&fs::read(&cache_file).unwrap()).unwrap(),
        ..HashCache::default()
    };
    let started = std::time::Instant::now();
    let mut warm = load();
    let warm_time = time(&mut warm);
    let with_load = started.elapsed();
    assert_eq!(warm.hashed, 0);
    fs::write(
        t.at("f500.sql"),
        "-- changed\ncreate table t500 (x int);\n\\ir f501.sql\n",
    )
    .unwrap();
    let mut one = load();
    let one_changed = time(&mut one);
    assert_eq!(one.hashed, 1);
    println!(
        "closure of {N} files: no cache {:.1} ms, cache {:.1} ms ({:.1} ms with loading it), one file changed {:.1} ms",
        first.as_secs_f64() * 1e3,
        warm_time.as_secs_f64() * 1e3,
        with_load.as_secs_f64() * 1e3,
        one_changed.as_secs_f64() * 1e3
    );
}
