//! Unit tests against a mocked API server (kube-rs's `tower-test` pattern): the pod specs
//! (golden files), the exact requests each runtime call sends, how watched pod statuses read,
//! the leader Lease, and that the Role grants exactly the requests the code sends.

mod fixtures;
mod golden;
mod lease;
mod mock;
mod phase;
mod rbac;
mod runtime;
