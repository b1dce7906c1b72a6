//! Fields written with no value (`listen:` alone, `ttl: ~`), found by a
//! read of the file that looks at nothing else.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::{Location, Spanned};

/// Fields written with no value, with where each is: serde reads such a
/// field as absent, so it would take its default unseen (an audit: a
/// template that rendered `listen:` empty served on 0.0.0.0:8080). Paths
/// as the shape errors name fields (`routes[0].idempotency`).
pub fn empty_values(text: &str) -> Vec<(String, Location)> {
    let found = RefCell::new(Vec::new());
    let walk = Walk {
        path: String::new(),
        at: None,
        found: &found,
    };
    // The first read has judged the shape: an error here ends the walk only.
    let _ = serde_saphyr::with_deserializer_from_str(text, |de| {
        de::DeserializeSeed::deserialize(walk, de)
    });
    found.into_inner()
}

/// One value of the file on the walk: its path and where its field is.
struct Walk<'a> {
    path: String,
    at: Option<Location>,
    found: &'a RefCell<Vec<(String, Location)>>,
}

/// Sections: fields that hold a mapping of settings, each with its own
/// default. Written empty (their lines commented out) they hold none.
const SECTIONS: [&str; 9] = [
    "defaults",
    "admin",
    "store",
    "timeouts",
    "idempotency",
    "fingerprint",
    "scope",
    "tls",
    "circuit_breaker",
];

impl Walk<'_> {
    fn empty<E>(self) -> Result<(), E> {
        let name = self.path.rsplit('.').next().unwrap_or_default();
        if let Some(at) = self.at.filter(|_| !SECTIONS.contains(&name)) {
            self.found.borrow_mut().push((self.path, at));
        }
        Ok(())
    }
}

impl<'de> de::DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.empty()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.empty()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<Spanned<String>>()? {
            let path = match self.path.is_empty() {
                true => name.value,
                false => format!("{}.{}", self.path, name.value),
            };
            let at = Some(name.referenced);
            map.next_value_seed(Walk { path, at, ..self })?;
        }
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let path = format!("{}[{i}]", self.path);
            let item = Walk { path, ..self };
            if seq.next_element_seed(item)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}
