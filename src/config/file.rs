//! The configuration file as written: serde structs that reject unknown fields.
//!
//! Everything is optional here so that defaults can be merged field by field;
//! `config::validate` turns these into the validated `Config`.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

/// A string value with its place in the file.
pub type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<Spanned<ScalarOr<ListenFile>>>,
    pub admin: Option<AdminFile>,
    pub store: Option<StoreFile>,
    pub shutdown_grace: Option<Text>,
    pub send_timeout: Option<Text>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamFile>,
    pub defaults: Option<RouteSettings>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    pub address: Text,
    pub tls: Option<TlsListenFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenFile {
    pub cert_file: Text,
    pub key_file: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Text,
    pub token: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub backend: Option<Text>,
    pub url: Option<Text>,
    pub cluster: Option<Vec<Text>>,
    pub key_prefix: Option<Text>,
    pub op_timeout: Option<Text>,
    pub on_unavailable: Option<Text>,
    pub max_records: Option<Spanned<u64>>,
    /// For `rediss://`: a custom CA and an optional client certificate.
    pub tls: Option<UpstreamTlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub url: Text,
    pub connect_timeout: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub max_in_flight: Option<Spanned<u32>>,
    pub circuit_breaker: Option<Spanned<ScalarOr<BreakerFile>>>,
    pub tls: Option<UpstreamTlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    pub consecutive_failures: Option<Spanned<u32>>,
    pub open_for: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    pub ca_file: Option<Text>,
    pub client_cert_file: Option<Text>,
    pub client_key_file: Option<Text>,
}

/// What `defaults` holds and what every route may override.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub timeouts: Option<TimeoutsFile>,
    pub idempotency: Option<Spanned<ScalarOr<IdempotencyFile>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Text,
    #[serde(rename = "match")]
    pub matcher: MatchFile,
    pub upstream: Text,
    pub timeouts: Option<TimeoutsFile>,
    pub idempotency: Option<Spanned<ScalarOr<IdempotencyFile>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub path_prefix: Option<Text>,
    pub path: Option<Text>,
    pub methods: Option<Vec<Text>>,
    pub host: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub response: Option<Text>,
    pub total: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyFile {
    pub methods: Option<Vec<Text>>,
    pub header: Option<Text>,
    pub require_key: Option<bool>,
    pub key_max_length: Option<Spanned<usize>>,
    pub ttl: Option<Text>,
    pub lease: Option<Text>,
    pub concurrent: Option<Text>,
    pub fingerprint: Option<FingerprintFile>,
    pub scope: Option<ScopeFile>,
    pub store_statuses: Option<Vec<Text>>,
    pub release_statuses: Option<Vec<Spanned<u16>>>,
    pub on_unknown: Option<Text>,
    pub max_request_body: Option<Text>,
    pub max_response_body: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FingerprintFile {
    pub headers: Option<Vec<Text>>,
    pub query: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeFile {
    pub headers: Option<Vec<Text>>,
}

/// A field that is either a plain scalar (`off`, `false`, an address) or a mapping.
#[derive(Debug)]
pub enum ScalarOr<T> {
    Scalar(String),
    Map(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ScalarOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarOrVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ScalarOrVisitor<T> {
            type Value = ScalarOr<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar or a mapping")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ScalarOr::Scalar(v.to_owned()))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(ScalarOr::Scalar(v.to_string()))
            }

            // A number is a scalar too, judged by the field's own check
            // (regression: `listen: 8080` was "invalid type: integer,
            // expected a scalar or a mapping", with no word of ip:port).
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(ScalarOr::Scalar(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ScalarOr::Scalar(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(ScalarOr::Scalar(v.to_string()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(ScalarOr::Map)
            }
        }

        deserializer.deserialize_any(ScalarOrVisitor(PhantomData))
    }
}

/// Where each name under `upstreams` is written, from a second read of the
/// file that looks at nothing else: an error about a name points at its
/// line (regression: at its `url:`'s). The first read keeps plain string
/// keys, which name the field in its shape errors (`upstreams.erp.url`).
pub fn upstream_name_places(text: &str) -> BTreeMap<String, serde_saphyr::Location> {
    #[derive(Deserialize)]
    struct Names {
        #[serde(default)]
        upstreams: NamePlaces,
    }
    serde_saphyr::from_str::<Names>(text).map_or_else(|_| BTreeMap::new(), |n| n.upstreams.0)
}

#[derive(Default)]
struct NamePlaces(BTreeMap<String, serde_saphyr::Location>);

impl<'de> Deserialize<'de> for NamePlaces {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamesVisitor;

        impl<'de> Visitor<'de> for NamesVisitor {
            type Value = NamePlaces;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of upstream names")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NamePlaces, A::Error> {
                let mut places = BTreeMap::new();
                while let Some(name) = map.next_key::<Spanned<String>>()? {
                    map.next_value::<de::IgnoredAny>()?;
                    places.insert(name.value, name.referenced);
                }
                Ok(NamePlaces(places))
            }
        }

        deserializer.deserialize_map(NamesVisitor)
    }
}
