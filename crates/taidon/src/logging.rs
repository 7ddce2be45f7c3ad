//! Where and how `taidon` logs: text or JSON lines, on stderr or in a file it rotates by size
//! itself (`sqlrs` starts the daemon with `--log-file <home>/logs/taidon.log`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields`, `target`, and `span` (the
    /// innermost span's fields, such as an API request's `request_id`).
    Json,
}

/// The logging flags, accepted by every subcommand.
#[derive(Args, Debug, Clone)]
pub(crate) struct LogArgs {
    /// Log lines as text or as JSON objects (one a line). The level comes from TAIDON_LOG
    /// (default info).
    #[arg(
        long,
        global = true,
        env = "TAIDON_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    /// Write the log to this file instead of stderr, rotated by size: PATH.1 is the newest
    /// rotated file, PATH.N the oldest.
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// With --log-file: rotate when the file would grow past this many MiB (0: never).
    #[arg(long, global = true, env = "TAIDON_LOG_MAX_MB", default_value_t = 10)]
    log_max_mb: u64,
    /// With --log-file: rotate past this many KiB instead (takes precedence over
    /// --log-max-mb; for small disks and tests).
    #[arg(long, global = true, env = "TAIDON_LOG_MAX_KB", value_name = "N")]
    log_max_kb: Option<u64>,
    /// With --log-file: how many rotated files are kept (the oldest goes).
    #[arg(long, global = true, default_value_t = 3)]
    log_keep: u32,
}

impl LogArgs {
    /// The size cap of the log file, bytes (0: none).
    fn max_bytes(&self) -> u64 {
        match self.log_max_kb {
            Some(kb) => kb.saturating_mul(1024),
            None => self.log_max_mb.saturating_mul(1024 * 1024),
        }
    }
}

/// Installs the global subscriber the flags describe. The level filter is `TAIDON_LOG`.
pub(crate) fn init(args: &LogArgs) -> Result<()> {
    let filter = EnvFilter::try_from_env("TAIDON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = match &args.log_file {
        Some(path) => {
            let file = RotatingFile::open(path, args.max_bytes(), args.log_keep)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            BoxMakeWriter::new(file)
        }
        None => BoxMakeWriter::new(io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    Ok(())
}

/// A log file that never grows past a size cap: when a write would pass it, `PATH.N-1` becomes
/// `PATH.N` … `PATH` becomes `PATH.1` (the oldest beyond `keep` is dropped) and a fresh `PATH`
/// is begun. Each write (one event, as the formatter hands it over) lands whole in one file.
#[derive(Debug)]
pub(crate) struct RotatingFile {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    file: File,
    /// Bytes in `file`.
    len: u64,
    /// 0: no cap.
    max: u64,
    keep: u32,
    /// A rotation failed and stderr was told; it is told once.
    reported: bool,
}

impl RotatingFile {
    /// Opens (appends to) `path`, creating its directory, capped at `max` bytes (0: no cap)
    /// with `keep` rotated files.
    pub(crate) fn open(path: &Path, max: u64, keep: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = append(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            inner: Mutex::new(Inner {
                path: path.to_owned(),
                file,
                len,
                max,
                keep,
                reported: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while writing a log line leaves nothing half-done worth refusing.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `PATH.n`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Renames `from` to `to`; a missing `from` is nothing to do.
fn rename_if_there(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Inner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let grown = self.len.saturating_add(buf.len() as u64);
        if self.max > 0 && self.len > 0 && grown > self.max {
            if let Err(e) = self.rotate() {
                if !self.reported {
                    self.reported = true;
                    // The log itself is what failed; stderr is what is left.
                    let _ = writeln!(
                        io::stderr(),
                        "taidon: cannot rotate the log file {}: {e}; writing on past the cap",
                        self.path.display()
                    );
                }
                // Tried again once another cap's worth is written, not on every line.
                self.len = 0;
            }
        }
        self.file.write_all(buf)?;
        self.len = self.len.saturating_add(buf.len() as u64);
        Ok(buf.len())
    }

    /// Shifts the rotated files up by one, moves the current file to `PATH.1` and begins a
    /// fresh one.
    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            // `PATH.keep` is overwritten by `PATH.keep-1`: the oldest goes.
            for n in (1..self.keep).rev() {
                rename_if_there(&numbered(&self.path, n), &numbered(&self.path, n + 1))?;
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        self.file = append(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

/// One event's writer: writes go to the file under its lock.
pub(crate) struct RotatingWriter<'a>(&'a RotatingFile);

impl Write for RotatingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().file.flush()
    }
}

impl<'a> MakeWriter<'a> for RotatingFile {
    type Writer = RotatingWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        RotatingWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> String {
        format!("line {n:04} {}\n", "x".repeat(40))
    }

    fn write_lines(file: &RotatingFile, range: std::ops::Range<usize>) {
        for n in range {
            file.make_writer().write_all(line(n).as_bytes()).unwrap();
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// The files of the log, oldest first, and the numbers of the lines in them in order.
    fn all_lines(path: &Path, keep: u32) -> Vec<usize> {
        let mut files: Vec<PathBuf> = (1..=keep).rev().map(|n| numbered(path, n)).collect();
        files.push(path.to_owned());
        files
            .iter()
            .filter(|p| p.exists())
            .flat_map(|p| {
                read(p)
                    .lines()
                    .map(|l| {
                        assert!(l.len() == line(0).len() - 1, "a split line: {l:?}");
                        l[5..9].parse::<usize>().unwrap()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn files_stay_under_the_cap_hold_whole_lines_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/taidon.log");
        let size = line(0).len() as u64;
        // Room for three and a half lines.
        let max = size * 7 / 2;
        let file = RotatingFile::open(&path, max, 2).unwrap();
        write_lines(&file, 0..20);
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len <= max, "{} is {len} bytes", p.display());
            assert_eq!(len % size, 0, "{} holds a part of a line", p.display());
        }
        assert!(
            !numbered(&path, 3).exists(),
            "only two rotated files are kept"
        );
        // 20 lines, 3 per file: the last 2 in the current file, 3 in each rotated one.
        assert_eq!(all_lines(&path, 2), (12..20).collect::<Vec<_>>());
        assert_eq!(read(&path), line(18) + &line(19));
    }

    #[test]
    fn reopening_continues_the_file_and_its_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taidon.log");
        let size = line(0).len() as u64;
        let file = RotatingFile::open(&path, size * 2, 3).unwrap();
        write_lines(&file, 0..1);
        drop(file);
        let file = RotatingFile::open(&path, size * 2, 3).unwrap();
        write_lines(&file, 1..3);
        assert_eq!(read(&numbered(&path, 1)), line(0) + &line(1));
        assert_eq!(read(&path), line(2));
        assert_eq!(all_lines(&path, 3), vec![0, 1, 2]);
    }

    #[test]
    fn a_line_longer_than_the_cap_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taidon.log");
        let file = RotatingFile::open(&path, 10, 1).unwrap();
        write_lines(&file, 0..3);
        assert_eq!(read(&path), line(2));
        assert_eq!(read(&numbered(&path, 1)), line(1));
        assert!(!numbered(&path, 2).exists());
    }

    #[test]
    fn no_cap_never_rotates_and_keep_zero_drops_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let file = RotatingFile::open(&path, 0, 3).unwrap();
        write_lines(&file, 0..50);
        assert_eq!(all_lines(&path, 3), (0..50).collect::<Vec<_>>());
        assert!(!numbered(&path, 1).exists());

        let path = dir.path().join("b.log");
        let file = RotatingFile::open(&path, line(0).len() as u64, 0).unwrap();
        write_lines(&file, 0..5);
        assert_eq!(read(&path), line(4));
        assert!(!numbered(&path, 1).exists());
    }

    #[test]
    fn a_failed_rotation_keeps_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taidon.log");
        let size = line(0).len() as u64;
        let file = RotatingFile::open(&path, size, 1).unwrap();
        // A directory where the rotated file goes: the rename onto it fails.
        std::fs::create_dir(numbered(&path, 1)).unwrap();
        std::fs::write(numbered(&path, 1).join("x"), "x").unwrap();
        write_lines(&file, 0..4);
        assert!(file.lock().reported);
        assert_eq!(
            read(&path),
            (0..4).map(line).collect::<String>(),
            "every line is in the current file"
        );
    }

    #[test]
    fn concurrent_writers_never_interleave_within_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taidon.log");
        let size = line(0).len() as u64;
        let file = std::sync::Arc::new(RotatingFile::open(&path, size * 10, 50).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let file = std::sync::Arc::clone(&file);
                std::thread::spawn(move || write_lines(&file, t * 100..t * 100 + 100))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut seen = all_lines(&path, 50);
        assert_eq!(seen.len(), 400);
        // Each thread's lines appear in its own order.
        for t in 0..4 {
            let mine: Vec<usize> = seen.iter().copied().filter(|n| n / 100 == t).collect();
            assert_eq!(mine, (t * 100..t * 100 + 100).collect::<Vec<_>>());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..400).collect::<Vec<_>>());
    }
}
