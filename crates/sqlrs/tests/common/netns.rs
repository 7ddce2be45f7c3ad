//! Test hosts: network namespaces joined by a bridge, one address each, made by the test (as
//! root; CI runs as root and must not skip these) and removed when it ends. Traffic stays on
//! the bridge: no route leaves the machine.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A set of hosts on one /24.
pub struct Net {
    bridge: String,
    namespaces: Vec<String>,
    prefix: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// One namespace per name in `hosts`, each with its address on a new bridge.
    pub fn new(hosts: &[&str]) -> Self {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the multi-host tests make network namespaces and need root (CI runs as root)"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are at most 15 bytes.
        let tag = format!("{:x}{n:x}", pid % 0xffff);
        let prefix = format!("10.{}.{}", 200 + (n % 50), pid % 250);
        let bridge = format!("tb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        let mut net = Self {
            bridge,
            namespaces: Vec::new(),
            prefix,
        };
        for (i, host) in hosts.iter().enumerate() {
            let ns = format!("taidon-{host}-{tag}");
            let outer = format!("to{tag}{i}");
            let inner = format!("ti{tag}{i}");
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "master", &net.bridge, "up"]);
            let addr = format!("{}.{}/24", net.prefix, i + 1);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn index(&self, host: &str) -> usize {
        self.namespaces
            .iter()
            .position(|ns| ns.starts_with(&format!("taidon-{host}-")))
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    /// The address of `host`.
    pub fn addr(&self, host: &str) -> String {
        format!("{}.{}", self.prefix, self.index(host) + 1)
    }

    /// The namespace of `host`.
    pub fn namespace(&self, host: &str) -> &str {
        &self.namespaces[self.index(host)]
    }

    /// `program` to run on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.namespace(host)])
            .arg(program);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
