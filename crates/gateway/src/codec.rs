//! The server-side wire messages postgres-protocol lacks: a client's startup and password
//! packets, and the authentication and error messages a server sends. No I/O: parse from and
//! encode into a `BytesMut`.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest startup packet accepted, as PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
pub(crate) const MAX_STARTUP_LEN: usize = 10 * 1024;
/// The largest message a client may send before it is authenticated (a password).
pub(crate) const MAX_PREAUTH_MESSAGE_LEN: usize = 10 * 1024;

/// Protocol 3.0.
#[cfg(test)]
pub(crate) const PROTOCOL_3_0: u32 = 3 << 16;
/// The newest minor version of protocol 3 spoken: 3.2 (PostgreSQL 18), whose only change is a
/// cancel key of up to 256 bytes.
pub(crate) const NEWEST_MINOR: u16 = 2;
/// The longest cancel key protocol 3.2 allows.
pub(crate) const MAX_CANCEL_KEY_LEN: usize = 256;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Request codes (SSL, GSS, cancel) use this major version so they never collide with one.
const REQUEST_CODE_MAJOR: u32 = 1234;

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartupPacket {
    SslRequest,
    GssEncRequest,
    /// A CancelRequest: 4 bytes of key under protocol 3.0, up to 256 under 3.2.
    CancelRequest {
        process_id: i32,
        secret_key: Bytes,
    },
    /// A StartupMessage of protocol 3.`minor`.
    Startup {
        minor: u16,
        params: StartupParams,
    },
    /// A StartupMessage of a major version other than 3, or a request code already used.
    UnsupportedVersion(u32),
}

/// The parameters of a StartupMessage, in the order the client sent them, without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct StartupParams(Vec<(String, String)>);

/// The prefix of protocol options (as opposed to server parameters) in a StartupMessage.
pub(crate) const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

impl StartupParams {
    /// The value of `name`, if the client sent it.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every parameter as sent.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Removes the protocol options (`_pq_.*`) and returns their names: the gateway knows none,
    /// and none reaches the backend.
    pub(crate) fn take_protocol_options(&mut self) -> Vec<String> {
        let (options, params): (Vec<_>, Vec<_>) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(k, _)| k.starts_with(PROTOCOL_OPTION_PREFIX));
        self.0 = params;
        options.into_iter().map(|(k, _)| k).collect()
    }

    /// Sets `name`, replacing an earlier value as the server does for a repeated key.
    pub(crate) fn set(&mut self, name: String, value: String) {
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Splits the first NUL-terminated UTF-8 string off `buf`.
fn take_cstr(buf: &mut Bytes) -> io::Result<String> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| invalid("string is not NUL-terminated"))?;
    let s = buf.split_to(end);
    buf.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| invalid("string is not valid UTF-8"))
}

/// The first packet of a connection from `buf`; `None` means more bytes are needed.
pub(crate) fn parse_startup(buf: &mut BytesMut) -> io::Result<Option<StartupPacket>> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(invalid("invalid startup packet length"));
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut packet = buf.split_to(len).freeze();
    packet.advance(4);
    let code = packet.get_u32();
    let packet = match code {
        SSL_REQUEST_CODE if packet.is_empty() => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if packet.is_empty() => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE if (8..=4 + MAX_CANCEL_KEY_LEN).contains(&packet.len()) => {
            StartupPacket::CancelRequest {
                process_id: packet.get_i32(),
                secret_key: packet,
            }
        }
        c if c >> 16 == 3 => StartupPacket::Startup {
            minor: (c & 0xffff) as u16,
            params: parse_params(packet)?,
        },
        c if c >> 16 == REQUEST_CODE_MAJOR => {
            return Err(invalid("invalid length or code of a request packet"))
        }
        v => StartupPacket::UnsupportedVersion(v),
    };
    Ok(Some(packet))
}

/// The name/value pairs of a StartupMessage body, which ends with an empty name.
fn parse_params(mut body: Bytes) -> io::Result<StartupParams> {
    let mut params = StartupParams::default();
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            if !body.is_empty() {
                return Err(invalid("bytes after the end of the startup parameters"));
            }
            return Ok(params);
        }
        let value = take_cstr(&mut body)?;
        params.set(name, value);
    }
}

/// One tagged message from a client: its type byte and its body after the length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrontendMessage {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
}

/// One tagged client message from `buf`, refusing a length above `max_len`; `None` means more
/// bytes are needed.
pub(crate) fn parse_message(
    buf: &mut BytesMut,
    max_len: usize,
) -> io::Result<Option<FrontendMessage>> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=max_len).contains(&len) {
        return Err(invalid("invalid message length"));
    }
    // `len` counts itself but not the tag; bounded above, so this cannot overflow.
    let total = len + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total).freeze();
    msg.advance(5);
    Ok(Some(FrontendMessage { tag, body: msg }))
}

/// The password of a PasswordMessage ('p') body: one NUL-terminated string.
pub(crate) fn password(body: &Bytes) -> io::Result<String> {
    let mut body = body.clone();
    let password = take_cstr(&mut body)?;
    if !body.is_empty() {
        return Err(invalid("bytes after the password"));
    }
    Ok(password)
}

/// The answer to a GSSENCRequest, or an SSLRequest without TLS: go on in plain text.
pub(crate) const REFUSE_ENCRYPTION: &[u8] = b"N";

/// The answer to an SSLRequest when TLS is configured: go ahead with the TLS handshake.
pub(crate) const ACCEPT_SSL: &[u8] = b"S";

/// BackendKeyData: the key a client sends back in a CancelRequest (at most 256 bytes).
pub(crate) fn backend_key_data(process_id: i32, secret_key: &[u8], buf: &mut BytesMut) {
    let key = &secret_key[..secret_key.len().min(MAX_CANCEL_KEY_LEN)];
    buf.put_u8(b'K');
    buf.put_i32(8 + key.len() as i32);
    buf.put_i32(process_id);
    buf.put_slice(key);
}

/// A message with `tag` whose body `body` writes; its length is filled in after.
fn message(tag: u8, buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    body(buf);
    // Messages are ours and short; a length past i32 cannot happen.
    let len = i32::try_from(buf.len() - start - 1).unwrap_or(i32::MAX);
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// A string as a NUL-terminated field; NULs inside would end it early, so they are dropped.
fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.put_u8(0);
}

/// NegotiateProtocolVersion: the newest minor version of protocol 3 spoken, and the protocol
/// options of the client's StartupMessage that are not known.
pub(crate) fn negotiate_protocol_version(
    newest_minor: u16,
    unknown_options: &[String],
    buf: &mut BytesMut,
) {
    message(b'v', buf, |buf| {
        buf.put_i32(i32::from(newest_minor));
        buf.put_i32(unknown_options.len() as i32);
        for name in unknown_options {
            put_cstr(buf, name);
        }
    });
}

/// ReadyForQuery with a transaction status (`I`, `T` or `E`).
pub(crate) fn ready_for_query(status: u8, buf: &mut BytesMut) {
    buf.put_u8(b'Z');
    buf.put_i32(5);
    buf.put_u8(status);
}

/// ParameterStatus: a server parameter's current value.
pub(crate) fn parameter_status(name: &str, value: &str, buf: &mut BytesMut) {
    message(b'S', buf, |buf| {
        put_cstr(buf, name);
        put_cstr(buf, value);
    });
}

/// The name and value of a ParameterStatus body.
pub(crate) fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

fn authentication(code: i32, buf: &mut BytesMut) {
    buf.put_u8(b'R');
    buf.put_i32(8);
    buf.put_i32(code);
}

/// AuthenticationCleartextPassword: asks the client for its password (the token).
pub(crate) fn authentication_cleartext_password(buf: &mut BytesMut) {
    authentication(3, buf);
}

/// AuthenticationOk.
pub(crate) fn authentication_ok(buf: &mut BytesMut) {
    authentication(0, buf);
}

/// An ErrorResponse with severity, SQLSTATE and message. NULs would end a field early, so they
/// are dropped.
pub(crate) fn error_response(severity: &str, code: &str, message: &str, buf: &mut BytesMut) {
    self::message(b'E', buf, |buf| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            buf.put_u8(field);
            put_cstr(buf, value);
        }
        buf.put_u8(0);
    });
}

/// The fields of an ErrorResponse or NoticeResponse body, as (field type, value), for logs.
pub(crate) fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.push((field, String::from_utf8_lossy(&tail[..end]).into_owned()));
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn startup_bytes(params: &[(&str, &str)]) -> BytesMut {
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf).unwrap();
        buf
    }

    #[test]
    fn startup_message_round_trips_through_the_frontend_encoder() {
        let mut buf = startup_bytes(&[
            ("user", "sqlrs"),
            ("database", "postgres"),
            ("application_name", "test"),
            ("user", "again"),
        ]);
        buf.extend_from_slice(b"next");
        let Some(StartupPacket::Startup { minor: 0, params }) = parse_startup(&mut buf).unwrap()
        else {
            panic!("not a 3.0 startup message");
        };
        assert_eq!(params.get("user"), Some("again"), "a repeated key replaces");
        assert_eq!(params.get("database"), Some("postgres"));
        assert_eq!(params.get("options"), None);
        assert_eq!(params.iter().count(), 3);
        assert_eq!(&buf[..], b"next", "only the packet is consumed");
    }

    #[test]
    fn truncated_startup_needs_more_bytes_at_every_cut() {
        let full = startup_bytes(&[("user", "sqlrs")]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(parse_startup(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at cut {cut}");
        }
    }

    #[test]
    fn ssl_gss_and_cancel_requests() {
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        assert_eq!(
            parse_startup(&mut buf).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        buf.put_i32(8);
        buf.put_u32(GSSENC_REQUEST_CODE);
        assert_eq!(
            parse_startup(&mut buf).unwrap(),
            Some(StartupPacket::GssEncRequest)
        );
        frontend::cancel_request(42, -7, &mut buf);
        assert_eq!(
            parse_startup(&mut buf).unwrap(),
            Some(StartupPacket::CancelRequest {
                process_id: 42,
                secret_key: Bytes::copy_from_slice(&(-7i32).to_be_bytes()),
            })
        );
        assert!(buf.is_empty());
    }

    fn cancel_with_key(key_len: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32(12 + key_len as u32);
        buf.put_u32(CANCEL_REQUEST_CODE);
        buf.put_i32(42);
        buf.extend((0..key_len).map(|i| i as u8));
        buf
    }

    #[test]
    fn protocol_3_2_cancel_keys_up_to_256_bytes() {
        for len in [4, 32, 256] {
            let Some(StartupPacket::CancelRequest {
                process_id: 42,
                secret_key,
            }) = parse_startup(&mut cancel_with_key(len)).unwrap()
            else {
                panic!("key of {len} bytes not parsed");
            };
            assert_eq!(secret_key.len(), len);
            assert_eq!(secret_key[len - 1], (len - 1) as u8);
        }
        for len in [0, 3, 257] {
            assert!(
                parse_startup(&mut cancel_with_key(len)).is_err(),
                "key of {len} bytes accepted"
            );
        }
    }

    #[test]
    fn minor_versions_and_protocol_options_are_parsed_apart() {
        let mut buf = BytesMut::new();
        let body = b"user\0u\0_pq_.compression\0on\0database\0d\0\0";
        buf.put_u32(8 + body.len() as u32);
        buf.put_u32((3 << 16) | 9);
        buf.extend_from_slice(body);
        let Some(StartupPacket::Startup {
            minor: 9,
            mut params,
        }) = parse_startup(&mut buf).unwrap()
        else {
            panic!("not a 3.9 startup message");
        };
        assert_eq!(params.take_protocol_options(), vec!["_pq_.compression"]);
        assert_eq!(
            params.iter().collect::<Vec<_>>(),
            vec![("user", "u"), ("database", "d")]
        );
    }

    #[test]
    fn negotiate_protocol_version_and_key_data_parse_with_postgres_protocol() {
        use postgres_protocol::message::backend::Message;

        let mut buf = BytesMut::new();
        negotiate_protocol_version(2, &["_pq_.a".to_owned(), "_pq_.bc".to_owned()], &mut buf);
        assert_eq!(
            &buf[..],
            b"v\0\0\0\x1b\0\0\0\x02\0\0\0\x02_pq_.a\0_pq_.bc\0"
        );
        buf.clear();
        backend_key_data(7, &[1, 2, 3, 4], &mut buf);
        ready_for_query(b'I', &mut buf);
        parameter_status("TimeZone", "UTC", &mut buf);
        let Some(Message::BackendKeyData(k)) = Message::parse(&mut buf).unwrap() else {
            panic!("not BackendKeyData");
        };
        assert_eq!((k.process_id(), k.secret_key()), (7, 0x0102_0304));
        let Some(Message::ReadyForQuery(r)) = Message::parse(&mut buf).unwrap() else {
            panic!("not ReadyForQuery");
        };
        assert_eq!(r.status(), b'I');
        let Some(Message::ParameterStatus(p)) = Message::parse(&mut buf).unwrap() else {
            panic!("not ParameterStatus");
        };
        assert_eq!((p.name().unwrap(), p.value().unwrap()), ("TimeZone", "UTC"));
        assert_eq!(
            parse_parameter_status(b"TimeZone\0UTC\0"),
            Some(("TimeZone".to_owned(), "UTC".to_owned()))
        );
        // A 3.2 key of 32 bytes: length 8 + 32.
        buf.clear();
        backend_key_data(7, &[9; 32], &mut buf);
        assert_eq!(&buf[1..5], &40i32.to_be_bytes());
        assert_eq!(buf.len(), 41);
    }

    #[test]
    fn huge_tiny_and_malformed_lengths_are_refused() {
        for len in [0u32, 4, 7, MAX_STARTUP_LEN as u32 + 1, u32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.put_u32(PROTOCOL_3_0);
            assert!(parse_startup(&mut buf).is_err(), "length {len}");
        }
        // An SSLRequest code with a body is not an SSLRequest.
        let mut buf = BytesMut::new();
        buf.put_u32(12);
        buf.put_u32(SSL_REQUEST_CODE);
        buf.put_u32(0);
        assert!(parse_startup(&mut buf).is_err());
    }

    #[test]
    fn unknown_protocol_versions_are_reported_not_parsed() {
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        buf.put_u32(2 << 16);
        assert_eq!(
            parse_startup(&mut buf).unwrap(),
            Some(StartupPacket::UnsupportedVersion(2 << 16))
        );
        buf.put_u32(8);
        buf.put_u32(4 << 16);
        assert_eq!(
            parse_startup(&mut buf).unwrap(),
            Some(StartupPacket::UnsupportedVersion(4 << 16))
        );
    }

    #[test]
    fn startup_params_must_be_terminated_and_utf8() {
        let mut unterminated = BytesMut::new();
        unterminated.put_u32(8 + 5);
        unterminated.put_u32(PROTOCOL_3_0);
        unterminated.extend_from_slice(b"user\0");
        assert!(parse_startup(&mut unterminated).is_err());

        let mut not_utf8 = BytesMut::new();
        not_utf8.put_u32(8 + 6);
        not_utf8.put_u32(PROTOCOL_3_0);
        not_utf8.extend_from_slice(b"\xff\0a\0\0\0");
        assert!(parse_startup(&mut not_utf8).is_err());
    }

    #[test]
    fn password_message_parses_and_truncation_waits() {
        let mut full = BytesMut::new();
        frontend::password_message(b"the.jwt.token", &mut full).unwrap();
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(
                parse_message(&mut buf, MAX_PREAUTH_MESSAGE_LEN).unwrap(),
                None
            );
        }
        let msg = parse_message(&mut full, MAX_PREAUTH_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(msg.tag, b'p');
        assert_eq!(password(&msg.body).unwrap(), "the.jwt.token");
        assert!(full.is_empty());

        assert!(password(&Bytes::from_static(b"no nul")).is_err());
        assert!(password(&Bytes::from_static(b"a\0b\0")).is_err());
    }

    #[test]
    fn huge_and_short_message_lengths_are_refused() {
        for len in [0u32, 3, MAX_PREAUTH_MESSAGE_LEN as u32 + 1, u32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'p');
            buf.put_u32(len);
            assert!(parse_message(&mut buf, MAX_PREAUTH_MESSAGE_LEN).is_err());
        }
    }

    #[test]
    fn encoded_server_messages_parse_with_postgres_protocol() {
        use postgres_protocol::message::backend::Message;

        let mut buf = BytesMut::new();
        authentication_cleartext_password(&mut buf);
        authentication_ok(&mut buf);
        error_response("FATAL", "28P01", "bad\0 password", &mut buf);
        assert!(matches!(
            Message::parse(&mut buf).unwrap(),
            Some(Message::AuthenticationCleartextPassword)
        ));
        assert!(matches!(
            Message::parse(&mut buf).unwrap(),
            Some(Message::AuthenticationOk)
        ));
        let mut raw = buf.clone();
        let Some(Message::ErrorResponse(_)) = Message::parse(&mut buf).unwrap() else {
            panic!("not an error response");
        };
        assert!(buf.is_empty());
        raw.advance(5);
        assert_eq!(
            error_fields(&raw),
            vec![
                (b'S', "FATAL".to_owned()),
                (b'V', "FATAL".to_owned()),
                (b'C', "28P01".to_owned()),
                (b'M', "bad password".to_owned()),
            ]
        );
    }
}
