//! The Kubernetes permissions the code uses, and nothing more: the Role in
//! `deploy/kubernetes` grants exactly these (a test renders the manifests and compares), and
//! the unit tests check that every request the runtime sends is covered.

/// One rule of a Role: verbs on a resource of an API group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// `""` for the core group.
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every verb on every resource the controller calls in its namespace.
pub const PERMISSIONS: &[Permission] = &[
    Permission {
        group: "",
        resource: "pods",
        verbs: &["create", "delete", "list", "watch"],
    },
    Permission {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create", "get", "update"],
    },
];
