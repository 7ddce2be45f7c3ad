//! Identifiers: 64-hex state ids (content hashes) and 16-hex instance ids (random).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {len} lowercase hex digits, got {got:?}")]
pub struct ParseIdError {
    what: &'static str,
    len: usize,
    got: String,
}

fn parse_hex<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], ParseIdError> {
    let err = || ParseIdError {
        what,
        len: N * 2,
        got: s.chars().take(80).collect(),
    };
    if s.len() != N * 2 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(err());
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
    Ok(out)
}

macro_rules! hex_id {
    ($(#[$meta:meta])* $name:ident, $bytes:expr, $what:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $bytes]);

        impl $name {
            /// The id from its raw bytes.
            pub const fn from_bytes(bytes: [u8; $bytes]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $bytes] {
                &self.0
            }

            /// The first eight hex digits, for people.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<$bytes>($what, s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        /// In the OpenAPI document: a string of lowercase hex digits.
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(format!("{}: {} lowercase hex digits", $what, $bytes * 2)))
                    .pattern(Some(format!("^[0-9a-f]{{{}}}$", $bytes * 2)))
                    .min_length(Some($bytes * 2))
                    .max_length(Some($bytes * 2))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

hex_id!(
    /// The id of an immutable database state: a SHA-256 over its canonical encoding
    /// (see [`crate::identity`]).
    StateId,
    32,
    "a state id"
);

hex_id!(
    /// The id of an instance: 64 random bits, chosen by the controller.
    InstanceId,
    8,
    "an instance id"
);

hex_id!(
    /// The id of a lease (a fresh copy handed to one test): 128 random bits, chosen by the
    /// controller, so one cannot be guessed from another.
    LeaseId,
    16,
    "a lease id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_id_round_trips_through_text_and_json() {
        let id = StateId::from_bytes([0xab; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<StateId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<StateId>(&json).unwrap(), id);
        assert_eq!(id.short(), "abababab");
    }

    #[test]
    fn ids_reject_wrong_length_uppercase_and_non_hex() {
        assert!("abc".parse::<StateId>().is_err());
        assert!("AB".repeat(32).parse::<StateId>().is_err());
        assert!("zz".repeat(32).parse::<StateId>().is_err());
        assert!("00".repeat(8).parse::<InstanceId>().is_ok());
        assert!("00".repeat(9).parse::<InstanceId>().is_err());
    }
}
