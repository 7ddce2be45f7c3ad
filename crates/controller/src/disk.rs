//! Which disk a directory is on, and how full it is: what an error says when a build runs the
//! disk under the store out of space.

use std::path::{Path, PathBuf};

/// The file system holding a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Disk {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// Its device (`/dev/loop3`, `tmpfs`, …).
    pub device: String,
    pub total_bytes: u64,
    /// What an unprivileged writer may still use.
    pub free_bytes: u64,
}

impl Disk {
    /// The disk holding `path`, if `path` is a local directory.
    pub(crate) fn of(path: &Path) -> Option<Disk> {
        let path = path.canonicalize().ok()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let (mount, device) = mount_of(&mountinfo, &path)?;
        let (total_bytes, free_bytes) = space(&path)?;
        Some(Disk {
            mount,
            device,
            total_bytes,
            free_bytes,
        })
    }

    /// One line naming the disk, for an error: `the disk under PATH (DEVICE mounted at MOUNT)
    /// is full: F MiB free of T MiB`.
    pub(crate) fn full_note(&self, what: &str, path: &Path) -> String {
        format!(
            "the disk under {what} {} ({} mounted at {}) is full: {:.1} MiB free of {:.1} MiB; \
             free some space and prepare again",
            path.display(),
            self.device,
            self.mount.display(),
            self.free_bytes as f64 / (1 << 20) as f64,
            self.total_bytes as f64 / (1 << 20) as f64,
        )
    }
}

/// Whether an error's text says a write found no space.
pub(crate) fn says_disk_full(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("os error 28")
}

/// The mount point (and its device) of the longest mount that contains `path`, from the text
/// of `/proc/self/mountinfo`.
fn mount_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String)> {
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root MOUNT options... - fstype SOURCE super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount) = fields.get(4).map(|m| PathBuf::from(unescape(m))) else {
            continue;
        };
        let source = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 2))
            .map_or_else(String::new, |s| unescape(s));
        if path.starts_with(&mount)
            && best
                .as_ref()
                .is_none_or(|(b, _)| mount.as_os_str().len() >= b.as_os_str().len())
        {
            best = Some((mount, source));
        }
    }
    best
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..=i + 3].iter().all(u8::is_ascii_digit) {
            let code = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(code as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_blocks as u64 * unit, st.f_bavail as u64 * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 7:3 / /tmp/x/mnt rw,relatime shared:20 - xfs /dev/loop3 rw,attr2
41 22 7:4 / /tmp/x/mnt\\040two rw,relatime shared:21 - btrfs /dev/loop4 rw
";

    #[test]
    fn the_longest_mount_holding_the_path_wins() {
        let (m, d) = mount_of(MOUNTINFO, Path::new("/tmp/x/mnt/home/snapshots")).unwrap();
        assert_eq!(
            (m.as_path(), d.as_str()),
            (Path::new("/tmp/x/mnt"), "/dev/loop3")
        );
        let (m, d) = mount_of(MOUNTINFO, Path::new("/tmp/x/mnt two/a")).unwrap();
        assert_eq!(
            (m.as_path(), d.as_str()),
            (Path::new("/tmp/x/mnt two"), "/dev/loop4")
        );
        let (m, d) = mount_of(MOUNTINFO, Path::new("/tmp/x/mntx")).unwrap();
        assert_eq!((m.as_path(), d.as_str()), (Path::new("/"), "/dev/vda"));
    }

    #[test]
    fn disk_full_is_recognised_in_postgres_and_io_errors() {
        assert!(says_disk_full(
            "PANIC:  could not write to file \"pg_wal/xlogtemp.1\": No space left on device"
        ));
        assert!(says_disk_full("copying: write base/1/2: os error 28"));
        assert!(!says_disk_full("syntax error at or near \"selec\""));
    }

    #[test]
    fn the_root_disk_is_found() {
        let d = Disk::of(Path::new("/")).unwrap();
        assert_eq!(d.mount, Path::new("/"));
        assert!(d.total_bytes > 0 && d.free_bytes <= d.total_bytes);
    }
}
