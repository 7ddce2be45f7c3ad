//! The test kit's servers speak S3 as the object tier's tests assume: signatures are checked,
//! a create-only put (`If-None-Match: *`) is refused once the key exists — also when many race —
//! and signed requests pass through the fault proxy.

use std::thread;

use taidon_testkit::fault::FaultProxy;
use taidon_testkit::s3::{env_for, signed_request, Backend, Credentials, S3Server};

fn check_signatures_and_create_only_puts(backend: Backend) {
    let test = format!("servers::{backend}");
    // Signatures are checked by SeaweedFS always, by moto only when asked to.
    let started = match backend {
        Backend::Moto => S3Server::moto_authenticating(&test),
        Backend::SeaweedFs => S3Server::start(backend, &test),
    };
    let Some(server) = started else {
        return;
    };
    server.create_bucket("kit");
    server.create_bucket("kit"); // again: ours already

    let put = server.request("PUT", "/kit/a", &[], b"one").unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let got = server.request("GET", "/kit/a", &[], b"").unwrap();
    assert_eq!((got.status, got.text().as_str()), (200, "one"));

    // A wrong secret and an unknown key are refused.
    let wrong = Credentials {
        access_key: server.access_key().to_owned(),
        secret_key: "not-the-secret".to_owned(),
    };
    let refused = signed_request(server.addr(), &wrong, "PUT", "/kit/a", &[], b"two").unwrap();
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("SignatureDoesNotMatch"),
        "{}",
        refused.text()
    );
    let unknown = Credentials {
        access_key: "AKIAUNKNOWNUNKNOWN00".to_owned(),
        secret_key: "x".to_owned(),
    };
    let refused = signed_request(server.addr(), &unknown, "GET", "/kit/a", &[], b"").unwrap();
    assert_eq!(refused.status, 403, "{}", refused.text());
    let got = server.request("GET", "/kit/a", &[], b"").unwrap();
    assert_eq!(got.text(), "one");

    // Create-only: the second put of a key is refused with 412 and changes nothing.
    let create = [("if-none-match", "*")];
    let first = server.request("PUT", "/kit/m", &create, b"first").unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let second = server.request("PUT", "/kit/m", &create, b"second").unwrap();
    assert_eq!(
        second.status,
        412,
        "{backend} did not refuse a create-only put of an existing key: {}",
        second.text()
    );
    assert_eq!(
        server.request("GET", "/kit/m", &[], b"").unwrap().text(),
        "first"
    );

    // Racing create-only puts of one key: exactly one wins, every round.
    for round in 0..5 {
        let key = format!("/kit/race-{round}");
        let statuses: Vec<u16> = thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (server, key) = (&server, &key);
                    s.spawn(move || {
                        let body = format!("writer {i}");
                        server
                            .request("PUT", key, &create, body.as_bytes())
                            .unwrap()
                            .status
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(
            won, 1,
            "{backend}: racing create-only puts, round {round}: {statuses:?}"
        );
        // AWS answers 409 to a conditional write racing another in flight, 412 after it.
        assert!(
            statuses.iter().all(|s| [200, 409, 412].contains(s)),
            "{statuses:?}"
        );
    }

    let env = env_for(&server);
    assert_eq!(env.len(), 3);
    assert!(env.contains(&(
        "AWS_ACCESS_KEY_ID".to_owned(),
        server.access_key().to_owned()
    )));
}

fn check_requests_through_the_fault_proxy(backend: Backend) {
    let test = format!("servers::{backend}::fault proxy");
    let Some(server) = S3Server::start(backend, &test) else {
        return;
    };
    server.create_bucket("kit");
    let proxy = FaultProxy::start(server.addr(), 3);
    let mut statuses = vec![];
    for i in 0..6 {
        // Signed for the proxy's address, which is the Host the upstream sees.
        let body = format!("body {i}");
        let r = signed_request(
            proxy.addr(),
            server.credentials(),
            "PUT",
            &format!("/kit/k{i}"),
            &[],
            body.as_bytes(),
        )
        .unwrap();
        if r.status == 503 {
            assert!(r.text().contains("<Code>SlowDown</Code>"), "{}", r.text());
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, [200, 200, 503, 200, 200, 503], "{}", server.log());
    assert_eq!((proxy.requests_seen(), proxy.requests_failed()), (6, 2));
    let got = server.request("GET", "/kit/k3", &[], b"").unwrap();
    assert_eq!(got.text(), "body 3");
    let missing = server.request("GET", "/kit/k2", &[], b"").unwrap();
    assert_eq!(missing.status, 404, "a failed request reached the server");
}

#[test]
fn moto_checks_signatures_and_create_only_puts() {
    check_signatures_and_create_only_puts(Backend::Moto);
}

#[test]
fn seaweedfs_checks_signatures_and_create_only_puts() {
    check_signatures_and_create_only_puts(Backend::SeaweedFs);
}

#[test]
fn moto_serves_signed_requests_through_the_fault_proxy() {
    check_requests_through_the_fault_proxy(Backend::Moto);
}

#[test]
fn seaweedfs_serves_signed_requests_through_the_fault_proxy() {
    check_requests_through_the_fault_proxy(Backend::SeaweedFs);
}
