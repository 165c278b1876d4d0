//! Reading a few fields out of JSON that anyone on the internet may send, without building it.
//!
//! A `serde_json::Value` tree costs up to 32 bytes per element: a 1 MiB body of `[0,0,...]` became a
//! 16 MiB tree before anything could tell it was not a notification, and sixteen of them at once were
//! enough to take the sidecar past its memory limit. These visitors walk the document once, keep only
//! the handful of fields a notification is routed and verified by (borrowed from the input where the
//! JSON has no escapes), and skip everything else with [`IgnoredAny`], which allocates nothing.
//!
//! They are lenient on purpose: a field of an unexpected type reads as [`Scalar::Other`] and a repeated
//! key keeps its last value (as a `Value` map did), so a body Apple might send in a future shape never
//! becomes an error. Only input that is not JSON at all is one.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{Deserialize, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A JSON value where we expect a string or an integer.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Scalar<'a> {
    Text(Cow<'a, str>),
    Integer(i64),
    /// Any other value (a float, an object, null, an integer beyond `i64`), skipped unread.
    #[default]
    Other,
}

impl Scalar<'_> {
    pub fn text(&self) -> Option<String> {
        match self {
            Scalar::Text(text) => Some(text.to_string()),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Text(text) => Some(text),
            _ => None,
        }
    }

    pub fn integer(&self) -> Option<i64> {
        match self {
            Scalar::Integer(n) => Some(*n),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Text(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Integer(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Scalar::Other, Scalar::Integer))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| Scalar::Other)
    }
}

/// The fields of one JSON object that a caller asked for by name; `None` for any value that is not
/// an object (skipped unread).
pub trait Fields<'de>: Default {
    /// Reads the value of `key` if it is one of ours (`map.next_value`) and says so; `false` leaves it
    /// to be skipped.
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
}

/// `Some(fields)` when the value is an object, `None` for any other JSON value.
pub struct ObjectOf<T>(pub Option<T>);

impl<'de, T: Fields<'de>> Deserialize<'de> for ObjectOf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectVisitor(PhantomData)).map(ObjectOf)
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Fields<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = T::default();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if !fields.read(&key, &mut map)? {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Some(fields))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }
    fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An object key, borrowed unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Reads `input` as one JSON document into `T`'s fields: `Ok(None)` for JSON that is not an object,
/// `Err` for input that is not JSON.
pub fn object<'de, T: Fields<'de>>(input: &'de [u8]) -> serde_json::Result<Option<T>> {
    serde_json::from_slice::<ObjectOf<T>>(input).map(|object| object.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug)]
    struct Picked<'a> {
        name: Option<Scalar<'a>>,
        count: Option<Scalar<'a>>,
        inner: Option<Inner<'a>>,
    }

    #[derive(Default, Debug)]
    struct Inner<'a> {
        id: Option<Scalar<'a>>,
    }

    impl<'de> Fields<'de> for Picked<'de> {
        fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
            match key {
                "name" => self.name = Some(map.next_value()?),
                "count" => self.count = Some(map.next_value()?),
                "inner" => self.inner = map.next_value::<ObjectOf<Inner>>()?.0,
                _ => return Ok(false),
            }
            Ok(true)
        }
    }

    impl<'de> Fields<'de> for Inner<'de> {
        fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
            if key != "id" {
                return Ok(false);
            }
            self.id = Some(map.next_value()?);
            Ok(true)
        }
    }

    #[test]
    fn picks_fields_borrowing_plain_strings_and_skipping_the_rest() {
        let input = br#"{"skip":[1,{"name":"nested"}],"name":"plain","count":7,"inner":{"id":"x\u0041","n":null}}"#;
        let picked = object::<Picked>(input).unwrap().unwrap();
        assert!(matches!(picked.name, Some(Scalar::Text(Cow::Borrowed("plain")))));
        assert_eq!(picked.count.and_then(|c| c.integer()), Some(7));
        let id = picked.inner.and_then(|inner| inner.id).unwrap();
        assert!(matches!(&id, Scalar::Text(Cow::Owned(text)) if text == "xA"), "{id:?}");
    }

    #[test]
    fn wrong_types_are_other_and_repeated_keys_keep_the_last() {
        let picked =
            object::<Picked>(br#"{"name":1.5,"count":"7","inner":[1],"name":{"a":1},"count":9}"#).unwrap().unwrap();
        assert_eq!(picked.name, Some(Scalar::Other));
        assert_eq!(picked.count, Some(Scalar::Integer(9)));
        assert!(picked.inner.is_none());
        let big = object::<Picked>(br#"{"count":18446744073709551615}"#).unwrap().unwrap();
        assert_eq!(big.count, Some(Scalar::Other));
    }

    #[test]
    fn non_objects_are_none_and_non_json_is_an_error() {
        assert!(object::<Picked>(b"[0,0,0]").unwrap().is_none());
        assert!(object::<Picked>(b"\"text\"").unwrap().is_none());
        assert!(object::<Picked>(b"null").unwrap().is_none());
        assert!(object::<Picked>(b"{\"name\":").is_err());
        assert!(object::<Picked>(b"{} trailing").is_err());
        assert!(object::<Picked>(b"").is_err());
    }
}
