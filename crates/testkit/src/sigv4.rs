//! AWS Signature Version 4 for the test kit's own requests (header-signed, payload hashed).

use std::time::{SystemTime, UNIX_EPOCH};

use ring::{digest, hmac};

/// Headers to send with a request: the caller's, plus `host`, `x-amz-content-sha256`,
/// `x-amz-date` and `authorization`. Every header given is signed.
///
/// `target` is the request target as sent (path, already URI-encoded, and an optional query).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sign(
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    service: &str,
    region: &str,
    access_key: &str,
    secret_key: &str,
    now: SystemTime,
) -> Vec<(String, String)> {
    let (amz_date, date) = amz_date(now);
    let payload_hash = hex::encode(digest::digest(&digest::SHA256, body));
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    all.push(("host".to_owned(), host.to_owned()));
    all.push(("x-amz-content-sha256".to_owned(), payload_hash.clone()));
    all.push(("x-amz-date".to_owned(), amz_date.clone()));
    all.sort();

    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.contains('=') {
                p.to_owned()
            } else {
                format!("{p}=")
            }
        })
        .collect();
    params.sort();
    let canonical_headers: String = all.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let signed_headers = all
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical = format!(
        "{method}\n{path}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        params.join("&")
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
    );
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
            .as_ref()
            .to_vec()
    };
    let key = mac(format!("AWS4{secret_key}").as_bytes(), &date);
    let key = mac(&key, region);
    let key = mac(&key, service);
    let key = mac(&key, "aws4_request");
    let signature = hex::encode(mac(&key, &string_to_sign));
    all.push((
        "authorization".to_owned(),
        format!(
            "AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
        ),
    ));
    all
}

/// `x-amz-date` (`20130524T000000Z`) and the scope's date (`20130524`) of a time, in UTC.
fn amz_date(now: SystemTime) -> (String, String) {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let date = format!("{y:04}{m:02}{d:02}");
    let time = format!("{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60);
    (format!("{date}T{time}Z"), date)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Percent-encodes a form or query value (RFC 3986 unreserved characters kept).
pub(crate) fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        let at = |secs| amz_date(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0).0, "19700101T000000Z");
        assert_eq!(at(1_369_353_600).0, "20130524T000000Z");
        assert_eq!(at(951_827_696).0, "20000229T123456Z");
        assert_eq!(at(4_102_444_799).0, "20991231T235959Z");
    }

    /// The "GET Object" example of AWS's Signature Version 4 documentation for S3.
    #[test]
    fn signs_the_documented_get_object_example() {
        let headers = sign(
            "GET",
            "examplebucket.s3.amazonaws.com",
            "/test.txt",
            &[("Range", "bytes=0-9")],
            b"",
            "s3",
            "us-east-1",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            UNIX_EPOCH + Duration::from_secs(1_369_353_600),
        );
        let auth = &headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn encodes_form_values() {
        assert_eq!(encode("a b/{\"*\"}~"), "a%20b%2F%7B%22%2A%22%7D~");
    }
}
