use super::*;

const NOW: u64 = 1_800_000_000;

fn hs_entry(kid: &str, secret: &[u8]) -> KeyEntry {
    KeyEntry {
        kid: kid.into(),
        alg: Algorithm::Hs256,
        secret_hex: Some(hex::encode(secret)),
        private_pkcs8_hex: None,
        public_hex: None,
    }
}

fn ed_entry(kid: &str) -> KeyEntry {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    KeyEntry {
        kid: kid.into(),
        alg: Algorithm::EdDsa,
        secret_hex: None,
        private_pkcs8_hex: Some(hex::encode(pkcs8.as_ref())),
        public_hex: Some(hex::encode(pair.public_key().as_ref())),
    }
}

fn file(current: &str, keys: Vec<KeyEntry>) -> KeysetFile {
    KeysetFile {
        audience: "install-1".into(),
        current: current.into(),
        keys,
    }
}

fn key() -> Keyset {
    Keyset::hs256(b"0123456789abcdef0123456789abcdef", "install-1")
}

fn claims(k: &Keyset) -> Claims {
    k.claims(
        StateId::from_bytes([1; 32]),
        InstanceId::from_bytes([2; 8]),
        Scope::Rw,
        NOW,
        600,
    )
}

#[test]
fn sign_then_verify_round_trips_with_kid_in_the_header() {
    let k = key();
    let c = claims(&k);
    let t = k.sign(&c).unwrap();
    assert_eq!(k.verify(&t, NOW + 10).unwrap(), c);
    assert_eq!(fingerprint(&t).len(), 12);
    let header = jsonwebtoken::decode_header(&t).unwrap();
    assert_eq!(header.kid.as_deref(), Some(k.kids()[0]));
    assert!(looks_like_jwt(&t));
    assert!(!looks_like_jwt("sqlrs"));
    assert!(!looks_like_jwt("a.b"));
}

#[test]
fn eddsa_keys_sign_and_verify_and_all_optional_claims_survive() {
    let ks = Keyset::from_file(&file("ed-1", vec![ed_entry("ed-1")])).unwrap();
    let mut c = ks.claims_for(StateId::from_bytes([5; 32]), Scope::Ro, NOW, 60);
    c.nonce = Some("n-1".into());
    c.sub = "ci-job-7".into();
    c.limits = Some(Limits {
        max_conn: Some(3),
        max_idle_s: Some(10),
        max_duration_s: None,
    });
    let t = ks.sign(&c).unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&t).unwrap().alg,
        jsonwebtoken::Algorithm::EdDSA
    );
    assert_eq!(ks.verify(&t, NOW).unwrap(), c);
}

#[test]
fn rotation_keeps_the_previous_key_accepted_and_drops_older_ones() {
    let f1 = file("ed-1", vec![ed_entry("ed-1")]);
    let ks1 = Keyset::from_file(&f1).unwrap();
    let t1 = ks1.sign(&claims(&ks1)).unwrap();

    let f2 = f1.rotated(ed_entry("ed-2"));
    assert_eq!(f2.current, "ed-2");
    let ks2 = Keyset::from_file(&f2).unwrap();
    assert_eq!(ks2.kids(), vec!["ed-2", "ed-1"]);
    let t2 = ks2.sign(&claims(&ks2)).unwrap();
    assert!(
        ks2.verify(&t1, NOW).is_ok(),
        "the previous key still verifies"
    );
    assert!(ks2.verify(&t2, NOW).is_ok());

    let ks3 = Keyset::from_file(&f2.rotated(hs_entry("hs-3", b"a fresh secret of 32 bytes......")))
        .unwrap();
    assert!(matches!(
        ks3.verify(&t1, NOW),
        Err(TokenError::UnknownKey { kid }) if kid == "ed-1"
    ));
    assert!(ks3.verify(&t2, NOW).is_ok());
}

#[test]
fn every_refusal_has_its_own_error() {
    let k = key();
    let t = k.sign(&claims(&k)).unwrap();
    // Expired, with the leeway.
    assert!(matches!(
        k.verify(&t, NOW + 600 + 31),
        Err(TokenError::Expired)
    ));
    assert!(k.verify(&t, NOW + 600 + 29).is_ok());
    let strict = k.clone().with_leeway(0);
    assert!(matches!(
        strict.verify(&t, NOW + 601),
        Err(TokenError::Expired)
    ));
    // Not yet valid.
    let mut early = claims(&k);
    early.nbf = Some(NOW + 100);
    let te = k.sign(&early).unwrap();
    assert!(matches!(k.verify(&te, NOW), Err(TokenError::NotYetValid)));
    assert!(k.verify(&te, NOW + 75).is_ok(), "within the leeway");

    let other_aud = Keyset::hs256(b"0123456789abcdef0123456789abcdef", "install-2");
    assert!(matches!(
        other_aud.verify(&t, NOW),
        Err(TokenError::WrongAudience)
    ));
    // A token whose kid is known but whose signature was made with another secret.
    let forged = Keyset::from_file(&file(
        k.kids()[0],
        vec![hs_entry(k.kids()[0], b"another secret of enough length!")],
    ))
    .unwrap();
    let tf = forged.sign(&claims(&forged)).unwrap();
    assert!(matches!(k.verify(&tf, NOW), Err(TokenError::BadSignature)));
    // Unknown kid.
    let stranger = Keyset::from_file(&file(
        "x",
        vec![hs_entry("x", b"0123456789abcdef0123456789abcdef")],
    ))
    .unwrap();
    let tx = stranger.sign(&claims(&stranger)).unwrap();
    assert!(matches!(
        k.verify(&tx, NOW),
        Err(TokenError::UnknownKey { .. })
    ));
    // A kid naming an EdDSA key on an HS256 token.
    let mixed = Keyset::from_file(&file("ed", vec![ed_entry("ed")])).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("ed".into());
    let th = jsonwebtoken::encode(
        &header,
        &claims(&mixed),
        &jsonwebtoken::EncodingKey::from_secret(b"whatever secret"),
    )
    .unwrap();
    assert!(matches!(
        mixed.verify(&th, NOW),
        Err(TokenError::WrongAlgorithm)
    ));

    assert!(matches!(
        k.verify("not.a.jwt", NOW),
        Err(TokenError::Malformed(_))
    ));
    assert!(k.verify("", NOW).is_err());
}

#[test]
fn tokens_without_kid_from_before_keysets_still_verify() {
    let k = key();
    let c = claims(&k);
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &c,
        &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .unwrap();
    assert_eq!(k.verify(&t, NOW).unwrap(), c);
}

#[test]
fn bad_keyset_files_are_refused_whole() {
    assert!(matches!(Keyset::from_json("{"), Err(KeysetError::Json(_))));
    assert!(matches!(
        Keyset::from_file(&file("a", vec![])),
        Err(KeysetError::Empty)
    ));
    assert!(matches!(
        Keyset::from_file(&file("b", vec![hs_entry("a", b"0123456789abcdef")])),
        Err(KeysetError::NoCurrent(_))
    ));
    assert!(matches!(
        Keyset::from_file(&file("a", vec![hs_entry("a", b"short")])),
        Err(KeysetError::BadKey { .. })
    ));
    assert!(matches!(
        Keyset::from_file(&file(
            "a",
            vec![
                hs_entry("a", b"0123456789abcdef"),
                hs_entry("a", b"0123456789abcdef")
            ]
        )),
        Err(KeysetError::DuplicateKid(_))
    ));
    let mut public_only = ed_entry("e");
    public_only.private_pkcs8_hex = None;
    assert!(matches!(
        Keyset::from_file(&file("e", vec![public_only.clone()])),
        Err(KeysetError::BadKey { .. })
    ));
    // A public-only key is fine as a previous key.
    let ks = Keyset::from_file(&file(
        "a",
        vec![hs_entry("a", b"0123456789abcdef"), public_only],
    ))
    .unwrap();
    assert_eq!(ks.kids().len(), 2);
    let json = serde_json::to_string(&file("a", vec![hs_entry("a", b"0123456789abcdef")])).unwrap();
    assert!(Keyset::from_json(&json).is_ok());
}

#[test]
fn shared_keyset_swaps_whole() {
    let shared = SharedKeyset::new(key());
    let before = shared.get();
    shared.replace(Keyset::hs256(
        b"fedcba9876543210fedcba9876543210",
        "install-1",
    ));
    assert_ne!(before.kids(), shared.get().kids());
}

#[test]
fn public_entries_carry_no_secret_and_verify_what_the_full_keyset_signs() {
    let full = Keyset::from_file(&file(
        "ed-1",
        vec![ed_entry("ed-1"), hs_entry("hs-1", b"0123456789abcdef0123")],
    ))
    .unwrap();
    let public = full.public_entries();
    assert_eq!(public.len(), 1, "HS256 is never public");
    assert_eq!(public[0].kid, "ed-1");
    assert!(public[0].private_pkcs8_hex.is_none() && public[0].secret_hex.is_none());
    assert_eq!(full.current(), Some(("ed-1", Algorithm::EdDsa)));

    let verifier = Keyset::verify_only(&KeysetFile {
        audience: full.audience().to_owned(),
        current: "ed-1".into(),
        keys: public,
    })
    .unwrap();
    assert_eq!(verifier.current(), None);
    let token = full.sign(&claims(&full)).unwrap();
    assert_eq!(verifier.verify(&token, NOW).unwrap(), claims(&full));
    assert!(matches!(
        verifier.sign(&claims(&full)),
        Err(TokenError::NoSigningKey)
    ));
}
