//! Streaming extraction of output text and usage objects from provider JSON.
//!
//! A static selector tree ([`Sel`]) names the string fields worth keeping (message text, tool-call
//! arguments, reasoning text) and the output items worth counting (web search calls).
//! [`Select`] walks a JSON document with serde's visitor API, appending selected strings straight
//! into a [`TextSink`] and skipping everything else with `IgnoredAny`, so a chunk is read without
//! building a `serde_json::Value` or any per-chunk collection. The only allocation left on the
//! per-event path is serde_json's scratch buffer, used when a selected string contains escape
//! sequences. [`Envelope`] adds the top-level fields the meter needs besides text: `usage`,
//! `error`, the length of the selected array (`choices`, `output`) and the `service_tier` label,
//! which is copied only when it differs from the one already held (so once per response).
//!
//! Walking is lenient: a field of an unexpected JSON type is skipped rather than failing the
//! document, so a provider adding or retyping a field cannot lose us the usage numbers.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::api::is_label;

/// What to take from a JSON value.
#[derive(Debug)]
pub(crate) enum Sel {
    /// A string, appended to the sink. Other types are skipped.
    Text,
    /// Any value, appended in compact JSON form (Anthropic `tool_use.input` objects). Builds a
    /// `serde_json::Value`, so it is only used on whole (non-stream) bodies.
    Json,
    /// An object: the listed keys are followed, the rest skipped.
    Obj(&'static [(&'static str, Sel)]),
    /// An array: every element is taken with the inner selector.
    Each(&'static Sel),
    /// An output item: counted in [`TextSink::tool_calls`] when its `type` is `kind` and its
    /// `status` is not `failed`; its listed keys are followed like [`Sel::Obj`]'s.
    Call {
        kind: &'static str,
        fields: &'static [(&'static str, Sel)],
    },
}

/// Collected output text with a hard size cap, and the billable tool calls seen.
#[derive(Debug, Default)]
pub(crate) struct TextSink {
    pub text: String,
    pub cap: usize,
    pub truncated: bool,
    /// Output items matched by a [`Sel::Call`] selector.
    pub tool_calls: u64,
}

impl TextSink {
    pub fn new(cap: usize) -> TextSink {
        TextSink {
            text: String::new(),
            cap,
            truncated: false,
            tool_calls: 0,
        }
    }

    /// Appends `s`, or as much of it as fits under the cap (cut at a character boundary).
    pub fn push(&mut self, s: &str) {
        let room = self.cap.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&s[..cut]);
        self.truncated = true;
    }
}

/// Selects text from one JSON value. Its value is the number of elements when the value was an
/// array (the meter needs `choices.len()`), `None` otherwise.
pub(crate) struct Select<'s> {
    pub sel: &'static Sel,
    pub sink: &'s mut TextSink,
}

impl<'de> DeserializeSeed<'de> for Select<'_> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        if let Sel::Json = self.sel {
            let value = serde_json::Value::deserialize(d)?;
            if !value.is_null() {
                self.sink.push(&value.to_string());
            }
            return Ok(None);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Select<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<usize>, E> {
        Ok(None)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_str<E>(self, v: &str) -> Result<Option<usize>, E> {
        if let Sel::Text = self.sel {
            self.sink.push(v);
        }
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<usize>, A::Error> {
        let mut n = 0;
        match self.sel {
            Sel::Each(inner) => {
                while seq
                    .next_element_seed(Select {
                        sel: inner,
                        sink: &mut *self.sink,
                    })?
                    .is_some()
                {
                    n += 1;
                }
            }
            _ => {
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
            }
        }
        Ok(Some(n))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<usize>, A::Error> {
        let (fields, call): (&'static [(&'static str, Sel)], Option<&'static str>) = match self.sel
        {
            Sel::Obj(fields) => (fields, None),
            Sel::Call { kind, fields } => (fields, Some(*kind)),
            _ => (&[], None),
        };
        let (mut is_call, mut failed) = (false, false);
        while let Some(key) = map.next_key_seed(KeySeed(|k: &str| field_key(fields, k)))? {
            match (key, call) {
                (Key::Field(i), _) => {
                    map.next_value_seed(Select {
                        sel: &fields[i].1,
                        sink: &mut *self.sink,
                    })?;
                }
                (Key::Type, Some(kind)) => is_call = map.next_value_seed(equals(kind))?,
                (Key::Status, Some(_)) => failed = map.next_value_seed(equals("failed"))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if is_call && !failed {
            self.sink.tool_calls = self.sink.tool_calls.saturating_add(1);
        }
        Ok(None)
    }
}

/// Applies `.0` to a JSON value when it is a string (borrowed or in serde_json's scratch
/// buffer: nothing is allocated); any other value is skipped and gives `T::default()`.
pub(crate) struct OnStr<F>(pub F);

impl<'de, T: Default, F: FnOnce(&str) -> T> DeserializeSeed<'de> for OnStr<F> {
    type Value = T;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Default, F: FnOnce(&str) -> T> Visitor<'de> for OnStr<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v))
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(T::default())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(T::default())
    }
}

/// Whether a JSON value is the string `expected`.
fn equals(expected: &'static str) -> OnStr<impl FnOnce(&str) -> bool> {
    OnStr(move |v: &str| v == expected)
}

/// A reported name (service tier, speed, region) stored in `slot`, copied only when it
/// differs from the one held. Values that are not names ([`is_label`]) are left out; so is
/// `auto`, which is what a request asks for, not a tier a response was served at.
pub(crate) fn store_label(slot: &mut Option<String>, value: &str) {
    if is_label(value) && value != "auto" && slot.as_deref() != Some(value) {
        *slot = Some(value.to_owned());
    }
}

/// A map key as [`field_key`] classifies it.
enum Key {
    /// Position in the selector's fields.
    Field(usize),
    /// `type` (not a selected field).
    Type,
    /// `status` (not a selected field).
    Status,
    Other,
}

/// A key of a selected object: its position in `fields`, else `type`, `status` or other.
fn field_key(fields: &[(&str, Sel)], v: &str) -> Key {
    match fields.iter().position(|(k, _)| *k == v) {
        Some(i) => Key::Field(i),
        None if v == "type" => Key::Type,
        None if v == "status" => Key::Status,
        None => Key::Other,
    }
}

/// Reads a map key and classifies it with the function it holds, without allocating the
/// key.
struct KeySeed<F>(F);

impl<'de, K, F: FnOnce(&str) -> K> DeserializeSeed<'de> for KeySeed<F> {
    type Value = K;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<K, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, K, F: FnOnce(&str) -> K> Visitor<'de> for KeySeed<F> {
    type Value = K;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<K, E> {
        Ok((self.0)(v))
    }
}

/// Top-level fields the meter reads besides text.
#[derive(Debug)]
pub(crate) struct EnvelopeInfo<U> {
    /// `usage`, when present and not null.
    pub usage: Option<U>,
    /// `error` was present and not null.
    pub error: bool,
    /// Length of the last selected field that was an array (`choices`, `output`).
    pub items: Option<usize>,
}

/// Reads a top-level object: `usage` as `U`, `error`, text through `fields`, and
/// `service_tier` into a label slot when one is given.
pub(crate) struct Envelope<'s, U> {
    pub fields: &'static [(&'static str, Sel)],
    pub sink: &'s mut TextSink,
    pub tier: Option<&'s mut Option<String>>,
    pub usage: PhantomData<U>,
}

impl<'s, U> Envelope<'s, U> {
    pub fn new(fields: &'static [(&'static str, Sel)], sink: &'s mut TextSink) -> Self {
        Envelope {
            fields,
            sink,
            tier: None,
            usage: PhantomData,
        }
    }

    /// Also reads `service_tier` into `slot` (see [`store_label`]).
    pub fn tier(mut self, slot: &'s mut Option<String>) -> Self {
        self.tier = Some(slot);
        self
    }
}

enum EnvelopeKey {
    Usage,
    Error,
    ServiceTier,
    Field(usize),
    Other,
}

/// A top-level key: one the envelope reads itself, else its position in `fields`.
fn envelope_key(fields: &[(&str, Sel)], v: &str) -> EnvelopeKey {
    match v {
        "usage" => EnvelopeKey::Usage,
        "error" => EnvelopeKey::Error,
        "service_tier" => EnvelopeKey::ServiceTier,
        _ => match fields.iter().position(|(k, _)| *k == v) {
            Some(i) => EnvelopeKey::Field(i),
            None => EnvelopeKey::Other,
        },
    }
}

impl<'de, U: Deserialize<'de>> DeserializeSeed<'de> for Envelope<'_, U> {
    type Value = EnvelopeInfo<U>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<EnvelopeInfo<U>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, U: Deserialize<'de>> Visitor<'de> for Envelope<'_, U> {
    type Value = EnvelopeInfo<U>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<EnvelopeInfo<U>, A::Error> {
        let mut info = EnvelopeInfo {
            usage: None,
            error: false,
            items: None,
        };
        while let Some(key) = map.next_key_seed(KeySeed(|k: &str| envelope_key(self.fields, k)))? {
            match key {
                EnvelopeKey::Usage => info.usage = map.next_value::<Option<U>>()?,
                EnvelopeKey::Error => {
                    info.error = map.next_value::<Option<IgnoredAny>>()?.is_some();
                }
                EnvelopeKey::ServiceTier => match self.tier.as_deref_mut() {
                    Some(slot) => map.next_value_seed(OnStr(|v: &str| store_label(slot, v)))?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                },
                EnvelopeKey::Field(i) => {
                    let (_, sel) = &self.fields[i];
                    let len = map.next_value_seed(Select {
                        sel,
                        sink: &mut *self.sink,
                    })?;
                    if len.is_some() {
                        info.items = len;
                    }
                }
                EnvelopeKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(info)
    }
}

/// Applies `seed` to the value of top-level `key` of an object (`response` of a Responses
/// stream event), skipping the other keys; `None` when the key is absent or null.
pub(crate) struct Nested<S> {
    pub key: &'static str,
    pub seed: S,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Nested<S> {
    type Value = Option<S::Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<S::Value>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Nested<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON object with `{}`", self.key)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<S::Value>, A::Error> {
        let mut seed = Some(self.seed);
        let mut out = None;
        while let Some(key) = map.next_key_seed(NamedKey(self.key))? {
            match (key, seed.take()) {
                (true, Some(s)) => out = map.next_value_seed(OptionalSeed(s))?,
                (_, s) => {
                    seed = s;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// Whether a map key is `.0`, read without allocating.
struct NamedKey(&'static str);

impl<'de> DeserializeSeed<'de> for NamedKey {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NamedKey {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// `null` → `None`, anything else through the inner seed.
struct OptionalSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OptionalSeed<S> {
    type Value = Option<S::Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<S::Value>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OptionalSeed<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or null")
    }

    fn visit_none<E>(self) -> Result<Option<S::Value>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<S::Value>, E> {
        Ok(None)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<S::Value>, D::Error> {
        self.0.deserialize(d).map(Some)
    }
}

/// Runs `seed` over a complete JSON document, rejecting trailing garbage.
pub(crate) fn parse_with<'de, S: DeserializeSeed<'de>>(
    data: &'de [u8],
    seed: S,
) -> Result<S::Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let value = seed.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALL: Sel = Sel::Obj(&[("function", Sel::Obj(&[("arguments", Sel::Text)]))]);
    const MSG: Sel = Sel::Obj(&[("content", Sel::Text), ("tool_calls", Sel::Each(&CALL))]);
    const CHOICE: Sel = Sel::Obj(&[("delta", MSG)]);
    const TOP: &[(&str, Sel)] = &[("choices", Sel::Each(&CHOICE)), ("input", Sel::Json)];

    #[derive(Debug, Deserialize, PartialEq)]
    struct U {
        n: u64,
    }

    fn run(json: &str) -> (EnvelopeInfo<U>, String) {
        let mut sink = TextSink::new(1 << 20);
        let info = parse_with(json.as_bytes(), Envelope::<U>::new(TOP, &mut sink)).unwrap();
        (info, sink.text)
    }

    #[test]
    fn selects_nested_text_and_counts_choices() {
        let (info, text) = run(
            r#"{"id":"x","choices":[{"delta":{"content":"a\"b","role":"assistant"}},
               {"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{\"q\":1}"}}]}}],
               "usage":{"n":5},"error":null}"#,
        );
        assert_eq!(text, "a\"b{\"q\":1}");
        assert_eq!(info.usage, Some(U { n: 5 }));
        assert_eq!(info.items, Some(2));
        assert!(!info.error);
    }

    #[test]
    fn unexpected_types_are_skipped_not_fatal() {
        let (info, text) = run(
            r#"{"choices":[{"delta":{"content":null,"tool_calls":{"x":1}}},{"delta":["a"]},
               {"delta":{"content":7}}],"usage":null,"error":{"message":"boom"}}"#,
        );
        assert_eq!(text, "");
        assert_eq!(info.usage, None);
        assert_eq!(info.items, Some(3));
        assert!(info.error);
    }

    #[test]
    fn json_selector_serialises_values() {
        let (_, text) = run(r#"{"input":{"city":"Paris","n":[1,2]}}"#);
        assert_eq!(text, r#"{"city":"Paris","n":[1,2]}"#);
    }

    #[test]
    fn sink_cap_cuts_at_a_char_boundary() {
        let mut sink = TextSink::new(5);
        sink.push("ab");
        sink.push("é€x");
        assert_eq!(sink.text, "abé");
        assert!(sink.truncated);
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let mut sink = TextSink::new(10);
        assert!(parse_with(b"{} x", Envelope::<U>::new(TOP, &mut sink)).is_err());
    }
}
