//! A small reader over JSON values that checks a resource field by field and collects every
//! problem with its dotted key, so one `meshctl apply` reports all mistakes at once (serde stops
//! at the first). TOML files are converted to JSON values first, so both paths share one schema.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::name::Label;

/// Problems found so far, as (dotted key, message).
#[derive(Debug, Default)]
pub(crate) struct Cx {
    problems: Vec<(String, String)>,
}

/// A table being read: its keys were checked against the known ones when it was opened.
pub(crate) struct Table<'v> {
    map: &'v Map<String, Value>,
    at: String,
}

/// A closed set of lowercase values, read case-insensitively (so Istio's `ALLOW` works too).
pub(crate) trait Choice: Sized + Copy + 'static {
    /// Every value, in documentation order.
    const ALL: &'static [Self];
    /// The canonical spelling.
    fn as_str(self) -> &'static str;
}

/// Declares a [`Choice`] enum with its canonical spellings, `Display`, `FromStr` and serde.
macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $crate::policy::decode::Choice for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl $name {
            /// The canonical (TOML) spelling.
            pub fn as_str(self) -> &'static str {
                $crate::policy::decode::Choice::as_str(self)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $crate::policy::decode::parse_choice(s)
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use choice_enum;

// === impl Cx ===

impl Cx {
    /// Records a problem at `at`.
    pub(crate) fn error(&mut self, at: &str, message: impl Into<String>) {
        self.problems.push((at.to_owned(), message.into()));
    }

    /// Whether nothing has been reported.
    pub(crate) fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// How many problems have been reported so far (compare before and after a read).
    pub(crate) fn count(&self) -> usize {
        self.problems.len()
    }

    /// The problems, in the order found.
    pub(crate) fn into_problems(self) -> Vec<(String, String)> {
        self.problems
    }
}

// === impl Table ===

impl<'v> Table<'v> {
    /// Opens `v` as a table whose keys must all be in `keys` (unknown keys are reported).
    pub(crate) fn new(v: &'v Value, at: &str, keys: &[&str], cx: &mut Cx) -> Option<Self> {
        match v {
            Value::Object(map) => Some(Self::from_map(map, at, keys, cx)),
            other => {
                cx.error(at, format!("expected a table, found {}", describe(other)));
                None
            }
        }
    }

    /// Opens an already unwrapped map; see [`Table::new`].
    pub(crate) fn from_map(
        map: &'v Map<String, Value>,
        at: &str,
        keys: &[&str],
        cx: &mut Cx,
    ) -> Self {
        for key in map.keys() {
            if !keys.contains(&key.as_str()) {
                let mut msg = format!("unknown key; valid keys here: {}", keys.join(", "));
                if let Some(near) = nearest(key, keys.iter().copied()) {
                    msg = format!(
                        "unknown key (did you mean {near:?}?); valid keys here: {}",
                        keys.join(", ")
                    );
                }
                cx.error(&join(at, key), msg);
            }
        }
        Self {
            map,
            at: at.to_owned(),
        }
    }

    /// The dotted key of `key` inside this table.
    pub(crate) fn key(&self, key: &str) -> String {
        join(&self.at, key)
    }

    /// Whether `key` is present (JSON `null` counts as absent).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// Reads an optional key; `None` when absent or invalid (the problem is recorded).
    pub(crate) fn opt<T>(
        &self,
        key: &str,
        cx: &mut Cx,
        read: impl FnOnce(&'v Value, &str, &mut Cx) -> Option<T>,
    ) -> Option<T> {
        let v = self.map.get(key).filter(|v| !v.is_null())?;
        read(v, &join(&self.at, key), cx)
    }

    /// Reads a required key; a missing key is reported with `what` (what it should hold).
    pub(crate) fn req<T>(
        &self,
        key: &str,
        what: &str,
        cx: &mut Cx,
        read: impl FnOnce(&'v Value, &str, &mut Cx) -> Option<T>,
    ) -> Option<T> {
        if !self.has(key) {
            cx.error(&join(&self.at, key), format!("missing; expected {what}"));
            return None;
        }
        self.opt(key, cx, read)
    }
}

// === paths ===

/// `at.key`, quoting keys that are not plain identifiers (`headers."x.y"`).
pub(crate) fn join(at: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if plain {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if at.is_empty() {
        key
    } else {
        format!("{at}.{key}")
    }
}

/// `at[i]`.
pub(crate) fn index(at: &str, i: usize) -> String {
    format!("{at}[{i}]")
}

// === leaf readers ===

/// A string.
pub(crate) fn string(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        other => {
            cx.error(at, format!("expected a string, found {}", describe(other)));
            None
        }
    }
}

/// A non-empty string.
pub(crate) fn nonempty(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let s = string(v, at, cx)?;
    if s.is_empty() {
        cx.error(at, "must not be empty");
        return None;
    }
    Some(s)
}

/// A DNS-label style name (service, namespace, subset, route name).
pub(crate) fn label(v: &Value, at: &str, cx: &mut Cx) -> Option<Label> {
    let s = string(v, at, cx)?;
    match Label::new(&s) {
        Ok(l) => Some(l),
        Err(e) => {
            cx.error(at, format!("{s:?} is not a valid name: {e}"));
            None
        }
    }
}

/// A boolean.
pub(crate) fn boolean(v: &Value, at: &str, cx: &mut Cx) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        other => {
            cx.error(
                at,
                format!("expected true or false, found {}", describe(other)),
            );
            None
        }
    }
}

/// An integer in `min..=max`.
pub(crate) fn uint(v: &Value, at: &str, cx: &mut Cx, min: u64, max: u64) -> Option<u64> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            let range = if max >= u64::from(u32::MAX) {
                format!("of at least {min}")
            } else {
                format!("from {min} to {max}")
            };
            cx.error(
                at,
                format!("expected an integer {range}, found {}", describe(v)),
            );
            None
        }
    }
}

/// A `u16` in `min..=max`.
pub(crate) fn u16_in(v: &Value, at: &str, cx: &mut Cx, min: u16, max: u16) -> Option<u16> {
    uint(v, at, cx, min.into(), max.into()).and_then(|n| u16::try_from(n).ok())
}

/// A `u32` in `min..=max`.
pub(crate) fn u32_in(v: &Value, at: &str, cx: &mut Cx, min: u32, max: u32) -> Option<u32> {
    uint(v, at, cx, min.into(), max.into()).and_then(|n| u32::try_from(n).ok())
}

/// A finite number (integers are accepted).
pub(crate) fn number(v: &Value, at: &str, cx: &mut Cx) -> Option<f64> {
    match v.as_f64() {
        Some(n) if n.is_finite() => Some(n),
        _ => {
            cx.error(at, format!("expected a number, found {}", describe(v)));
            None
        }
    }
}

/// A number in `min..=max`.
pub(crate) fn number_in(v: &Value, at: &str, cx: &mut Cx, min: f64, max: f64) -> Option<f64> {
    let n = number(v, at, cx)?;
    if !(min..=max).contains(&n) {
        cx.error(at, format!("{n} is out of range; expected {min} to {max}"));
        return None;
    }
    Some(n)
}

/// A humane, non-zero duration (`"250ms"`, `"2s"`, `"1m30s"`, `"30d"`).
pub(crate) fn duration(v: &Value, at: &str, cx: &mut Cx) -> Option<Duration> {
    let s = string(v, at, cx)?;
    match super::value::parse_duration(&s) {
        Some(d) if !d.is_zero() => Some(d),
        Some(_) => {
            cx.error(at, "must be longer than zero");
            None
        }
        None => {
            cx.error(
                at,
                format!(
                    "{s:?} is not a duration; expected a number and unit (ms, s, m, h, d) such \
                     as \"250ms\", \"2s\", \"1m30s\" or \"30d\""
                ),
            );
            None
        }
    }
}

/// One of a [`Choice`]'s values.
pub(crate) fn choice<T: Choice>(v: &Value, at: &str, cx: &mut Cx) -> Option<T> {
    let s = string(v, at, cx)?;
    match parse_choice(&s) {
        Ok(c) => Some(c),
        Err(e) => {
            cx.error(at, e);
            None
        }
    }
}

/// Parses a [`Choice`] case-insensitively; the error lists the valid values.
pub(crate) fn parse_choice<T: Choice>(s: &str) -> Result<T, String> {
    if let Some(c) = T::ALL.iter().find(|c| c.as_str().eq_ignore_ascii_case(s)) {
        return Ok(*c);
    }
    let names: Vec<&str> = T::ALL.iter().map(|c| c.as_str()).collect();
    let hint = nearest(s, names.iter().copied())
        .map(|n| format!(" (did you mean {n:?}?)"))
        .unwrap_or_default();
    Err(format!(
        "unknown value {s:?}{hint}; expected one of: {}",
        names.join(", ")
    ))
}

// === containers ===

/// A list whose items are read by `read`; `None` if it or any item is invalid.
pub(crate) fn list<'v, T>(
    v: &'v Value,
    at: &str,
    cx: &mut Cx,
    mut read: impl FnMut(&'v Value, &str, &mut Cx) -> Option<T>,
) -> Option<Vec<T>> {
    let Value::Array(items) = v else {
        cx.error(at, format!("expected a list, found {}", describe(v)));
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match read(item, &index(at, i), cx) {
            Some(x) => out.push(x),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// A list that must hold at least one item; `empty` says why an empty one is refused.
pub(crate) fn nonempty_list<'v, T>(
    v: &'v Value,
    at: &str,
    cx: &mut Cx,
    empty: &str,
    read: impl FnMut(&'v Value, &str, &mut Cx) -> Option<T>,
) -> Option<Vec<T>> {
    let items = list(v, at, cx, read)?;
    if items.is_empty() {
        cx.error(at, format!("must not be an empty list; {empty}"));
        return None;
    }
    Some(items)
}

/// A table of string keys (checked by `check_key`, which returns what is wrong) to values.
pub(crate) fn map<'v, T>(
    v: &'v Value,
    at: &str,
    cx: &mut Cx,
    check_key: fn(&str) -> Result<(), String>,
    mut read: impl FnMut(&'v Value, &str, &mut Cx) -> Option<T>,
) -> Option<BTreeMap<String, T>> {
    let Value::Object(entries) = v else {
        cx.error(at, format!("expected a table, found {}", describe(v)));
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, item) in entries {
        let here = join(at, k);
        if let Err(e) = check_key(k) {
            cx.error(&here, e);
            ok = false;
            continue;
        }
        match read(item, &here, cx) {
            Some(x) => {
                out.insert(k.clone(), x);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Workload labels: non-empty keys to string values.
pub(crate) fn labels(v: &Value, at: &str, cx: &mut Cx) -> Option<BTreeMap<String, String>> {
    map(v, at, cx, check_label_key, string)
}

fn check_label_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("label keys must not be empty".to_owned());
    }
    Ok(())
}

/// Reports every item whose `key` an earlier item already has, saying what is duplicated.
pub(crate) fn no_duplicates<T>(
    items: &[T],
    at: &str,
    cx: &mut Cx,
    what: &str,
    key: impl Fn(&T) -> String,
) -> bool {
    let keys: Vec<String> = items.iter().map(key).collect();
    let mut ok = true;
    for (i, k) in keys.iter().enumerate() {
        if let Some(first) = keys[..i].iter().position(|x| x == k) {
            cx.error(
                &index(at, i),
                format!(
                    "{what} {k} is already used by {}; each must be unique",
                    index(at, first)
                ),
            );
            ok = false;
        }
    }
    ok
}

// === helpers ===

/// A short description of a value for "found ..." messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a table".to_owned(),
    }
}

/// The candidate closest to `s` if it is a plausible typo (edit distance at most 2).
pub(crate) fn nearest<'a>(s: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let lower = s.to_ascii_lowercase();
    candidates
        .map(|c| (edit_distance(&lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Converts parsed TOML to a JSON value (datetimes become strings; non-finite floats become
/// strings too, so they are refused as "not a number" rather than silently dropped).
pub(crate) fn from_toml(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(from_toml).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, from_toml(v))).collect())
        }
    }
}
