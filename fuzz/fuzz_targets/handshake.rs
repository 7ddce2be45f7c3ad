//! Arbitrary client bytes through the gateway's startup and authentication steps: no panic, no
//! hang, and whatever comes back is well-framed server messages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = taidon_gateway::fuzzing::handshake(data);
    // Only 'N' (encryption refused), or messages: R (auth request), E (error), v (the protocol
    // version and options the gateway takes, to a client asking for a newer minor version).
    let mut rest = &out[..];
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'N' {
            rest = tail;
            continue;
        }
        assert!(
            matches!(first, b'R' | b'E' | b'v'),
            "unexpected server byte {first}"
        );
        assert!(tail.len() >= 4, "truncated header");
        let len = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]) as usize;
        assert!(len >= 4 && tail.len() >= len, "truncated message");
        rest = &tail[len..];
    }
});
