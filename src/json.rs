//! The JSON reader of the admission path: a serde `Deserializer` over text already known to be
//! UTF-8, built for bodies where most of the bytes belong to fields nobody reads.
//!
//! A pod create is about 4.7 kB, and fixity reads perhaps a tenth of it (names, images, pull
//! secrets). serde_json steps over the rest one value at a time through its generic machinery;
//! here a value nobody reads is stepped over by one loop (`scan::skip`) and strings are scanned
//! eight bytes at a time. Everything is still validated as strictly as serde_json does (escapes,
//! control characters, number syntax, nesting, trailing bytes), so a body is accepted here
//! exactly when serde_json would accept it; `tests` checks both agree.
//!
//! Strings borrow from the body unless they hold escapes. `RawJson` keeps a value as written.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

/// Nesting deeper than this is refused, as serde_json does, so hostile input cannot exhaust the
/// stack.
const MAX_DEPTH: u32 = 128;

/// Reads a `T` from `text`, which must hold exactly one JSON value (and whitespace).
pub fn from_str<'de, T: de::Deserialize<'de>>(text: &'de str) -> Result<T, Error> {
    from_seed(text, std::marker::PhantomData::<T>)
}

/// Reads what `seed` makes of `text`, which must hold exactly one JSON value.
pub fn from_seed<'de, S: DeserializeSeed<'de>>(text: &'de str, seed: S) -> Result<S::Value, Error> {
    let mut de = Deserializer::new(text);
    let value = seed
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
    value.map_err(|e| e.located(text, de.pos))
}

/// Why a text could not be read, and where. Boxed, so every `Result` on the hot path stays
/// one word wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(Box<ErrorImpl>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ErrorImpl {
    message: String,
    /// Line and column (1-based), once known.
    at: Option<(usize, usize)>,
}

impl Error {
    #[cold]
    fn new(message: impl Into<String>) -> Self {
        Self(Box::new(ErrorImpl {
            message: message.into(),
            at: None,
        }))
    }

    #[cold]
    fn expected(what: &str, at_end: bool) -> Self {
        match at_end {
            true => Self::new(format!("EOF while parsing, expected {what}")),
            false => Self::new(format!("expected {what}")),
        }
    }

    fn located(mut self, text: &str, pos: usize) -> Self {
        if self.0.at.is_none() {
            let before = &text.as_bytes()[..pos.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let column = before.len() - line_start + 1;
            self.0.at = Some((line, column));
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.at {
            Some((line, column)) => write!(f, "{} at line {line} column {column}", self.0.message),
            None => f.write_str(&self.0.message),
        }
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self::new(message.to_string())
    }
}

/// A value kept as written, for a later, different reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawJson<'a>(&'a str);

/// The newtype name by which `RawJson` asks this reader for the text of a value.
const RAW_TOKEN: &str = "$fixity::json::RawJson";

impl<'a> RawJson<'a> {
    pub fn get(&self) -> &'a str {
        self.0
    }
}

impl<'de: 'a, 'a> de::Deserialize<'de> for RawJson<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = RawJson<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value kept as written (only fixity::json can read one)")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(RawJson(v))
            }
        }
        d.deserialize_newtype_struct(RAW_TOKEN, RawVisitor)
    }
}

struct Deserializer<'de> {
    text: &'de str,
    bytes: &'de [u8],
    pos: usize,
    /// Levels of nesting still allowed.
    depth: u32,
}

impl<'de> Deserializer<'de> {
    fn new(text: &'de str) -> Self {
        Self {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            depth: MAX_DEPTH,
        }
    }

    /// Checks that only whitespace is left.
    fn end(&mut self) -> Result<(), Error> {
        self.skip_ws();
        match self.pos < self.bytes.len() {
            true => Err(Error::new("trailing characters")),
            false => Ok(()),
        }
    }

    #[inline(always)]
    fn skip_ws(&mut self) {
        self.pos = scan::after_ws(self.bytes, self.pos);
    }

    /// The next byte after whitespace, not consumed.
    #[inline(always)]
    fn peek(&mut self) -> Result<u8, Error> {
        self.skip_ws();
        self.bytes
            .get(self.pos)
            .copied()
            .ok_or_else(|| Error::new("EOF while parsing a value"))
    }

    #[inline(always)]
    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), Error> {
        self.skip_ws();
        match self.bytes.get(self.pos) {
            Some(&b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            found => Err(Error::expected(what, found.is_none())),
        }
    }

    fn literal(&mut self, word: &'static str) -> Result<(), Error> {
        scan::literal(self.bytes, &mut self.pos, word.as_bytes())
    }

    /// Reads the string whose opening quote is at `pos`: borrowed when it has no escapes.
    fn string(&mut self) -> Result<Text<'de>, Error> {
        let start = self.pos + 1;
        let (end, escaped) = scan::string_end(self.bytes, start)?;
        self.pos = end + 1;
        let raw = &self.text[start..end];
        match escaped {
            false => Ok(Text::Borrowed(raw)),
            true => unescape(raw).map(Text::Owned),
        }
    }

    /// Steps over one value of any shape, checking it as strictly as reading it would. Like
    /// serde_json's, it has no nesting limit: it loops rather than recurses.
    fn skip_value(&mut self) -> Result<(), Error> {
        scan::skip(self.bytes, &mut self.pos)
    }

    fn peek_after_value(&mut self) -> Result<u8, Error> {
        self.peek()
            .map_err(|_| Error::new("EOF while parsing a list or an object"))
    }

    fn number<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, Error> {
        let start = self.pos;
        let (end, integer) = scan::number_end(self.bytes, start)?;
        self.pos = end;
        let text = &self.text[start..end];
        if integer {
            match text.starts_with('-') {
                // `-0` is a float, as in serde_json: no integer holds a negative zero.
                true => match text.parse::<i64>() {
                    Ok(0) => return visitor.visit_f64(-0.0),
                    Ok(v) => return visitor.visit_i64(v),
                    Err(_) => {}
                },
                false => {
                    if let Ok(v) = text.parse::<u64>() {
                        return visitor.visit_u64(v);
                    }
                }
            }
        }
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => visitor.visit_f64(v),
            _ => Err(Error::new("number out of range")),
        }
    }

    /// Reads the inside of the array or object whose opening bracket is next, with `read`, then
    /// its `close`; nesting is limited as serde_json limits it, counted alike.
    fn nested<T>(
        &mut self,
        close: u8,
        what: &'static str,
        read: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        if self.depth <= 1 {
            return Err(Error::new("recursion limit exceeded"));
        }
        self.depth -= 1;
        self.pos += 1;
        let value = read(self)?;
        self.depth += 1;
        self.expect(close, what)?;
        Ok(value)
    }

    /// Reads an object key into `seed`, and the colon after it.
    fn key<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<K::Value, Error> {
        if self.peek()? != b'"' {
            return Err(Error::new("key must be a string"));
        }
        let key = match self.string()? {
            Text::Borrowed(s) => seed.deserialize(de::value::BorrowedStrDeserializer::new(s)),
            Text::Owned(s) => seed.deserialize(de::value::StringDeserializer::new(s)),
        }?;
        self.expect(b':', "`:`")?;
        Ok(key)
    }
}

/// The arrays and objects `skip` is inside, innermost in the lowest bit: a word holds 64
/// levels, and deeper ones spill the word onto a vector that no real object needs.
#[derive(Default)]
struct Nesting {
    /// Bit i: whether the level i steps out from the innermost is an object (else an array).
    bits: u64,
    levels: usize,
    spilled: Vec<u64>,
}

impl Nesting {
    #[inline(always)]
    fn push(&mut self, is_object: bool) {
        if self.levels > 0 && self.levels % 64 == 0 {
            self.spilled.push(self.bits);
        }
        self.bits = self.bits << 1 | u64::from(is_object);
        self.levels += 1;
    }

    #[inline(always)]
    fn pop(&mut self) {
        self.levels -= 1;
        self.bits >>= 1;
        if self.levels > 0 && self.levels % 64 == 0 {
            self.bits = self.spilled.pop().unwrap_or_default();
        }
    }

    /// Whether the innermost level is an object; `None` outside any.
    #[inline(always)]
    fn top(&self) -> Option<bool> {
        (self.levels > 0).then_some(self.bits & 1 == 1)
    }
}

/// A string as read: borrowed from the body, or unescaped into its own buffer.
enum Text<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> Text<'de> {
    fn visit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Text::Borrowed(s) => visitor.visit_borrowed_str(s),
            Text::Owned(s) => visitor.visit_string(s),
        }
    }
}

/// Resolves the escapes of a string's contents (already checked by `scan::string_end`,
/// except for what `\u` escapes mean).
fn unescape(raw: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let bytes = rest.as_bytes();
        let (ch, used) = match bytes[i + 1] {
            b'"' => ('"', 2),
            b'\\' => ('\\', 2),
            b'/' => ('/', 2),
            b'b' => ('\u{8}', 2),
            b'f' => ('\u{c}', 2),
            b'n' => ('\n', 2),
            b'r' => ('\r', 2),
            b't' => ('\t', 2),
            _ => {
                // `\uXXXX`, a UTF-16 unit; a surrogate needs its partner right after.
                let unit = hex4(&rest[i + 2..i + 6]);
                match unit {
                    0xD800..=0xDBFF => {
                        let low = rest[i + 6..]
                            .strip_prefix("\\u")
                            .and_then(|s| s.get(..4))
                            .map(hex4)
                            .filter(|low| (0xDC00..=0xDFFF).contains(low))
                            .ok_or_else(|| Error::new("lone leading surrogate in hex escape"))?;
                        let code = 0x10000
                            + ((u32::from(unit) - 0xD800) << 10)
                            + (u32::from(low) - 0xDC00);
                        (char::from_u32(code).unwrap_or('\u{FFFD}'), 12)
                    }
                    0xDC00..=0xDFFF => {
                        return Err(Error::new("lone trailing surrogate in hex escape"));
                    }
                    _ => (char::from_u32(u32::from(unit)).unwrap_or('\u{FFFD}'), 6),
                }
            }
        };
        out.push(ch);
        rest = &rest[i + used..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Four hex digits, already checked by `scan::string_end`.
fn hex4(digits: &str) -> u16 {
    u16::from_str_radix(digits, 16).unwrap_or(0)
}

impl<'de> de::Deserializer<'de> for &mut Deserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek()? {
            b'"' => self.string()?.visit(visitor),
            b'{' => self.nested(b'}', "`,` or `}`", |de| visitor.visit_map(Access::new(de))),
            b'[' => self.nested(b']', "`,` or `]`", |de| visitor.visit_seq(Access::new(de))),
            b't' => {
                self.literal("true")?;
                visitor.visit_bool(true)
            }
            b'f' => {
                self.literal("false")?;
                visitor.visit_bool(false)
            }
            b'n' => {
                self.literal("null")?;
                visitor.visit_unit()
            }
            b'-' | b'0'..=b'9' => self.number(visitor),
            _ => Err(Error::new("expected value")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.peek()? {
            b'n' => {
                self.literal("null")?;
                visitor.visit_none()
            }
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.skip_value()?;
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == RAW_TOKEN {
            self.skip_ws();
            let start = self.pos;
            self.skip_value()?;
            return visitor.visit_borrowed_str(&self.text[start..self.pos]);
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.peek()? {
            // A unit variant: "Name".
            b'"' => match self.string()? {
                Text::Borrowed(s) => visitor.visit_enum(s.into_deserializer()),
                Text::Owned(s) => visitor.visit_enum(s.into_deserializer()),
            },
            // Any other variant: {"Name": value}.
            b'{' => self.nested(b'}', "`}` after the enum's one variant", |de| {
                visitor.visit_enum(Variant { de })
            }),
            _ => Err(Error::new(
                "expected an enum: a string or an object of one key",
            )),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

/// The elements of an array or the entries of an object, after its opening bracket.
struct Access<'a, 'de> {
    de: &'a mut Deserializer<'de>,
    first: bool,
}

impl<'a, 'de> Access<'a, 'de> {
    fn new(de: &'a mut Deserializer<'de>) -> Self {
        Self { de, first: true }
    }

    /// Whether another element follows; consumes the comma before it. A comma with nothing
    /// after it is refused by what reads the element: no value or key starts with a bracket.
    fn has_next(&mut self, close: u8) -> Result<bool, Error> {
        let b = self.de.peek_after_value()?;
        if b == close {
            return Ok(false);
        }
        if self.first {
            self.first = false;
            return Ok(true);
        }
        match b {
            b',' => {
                self.de.pos += 1;
                Ok(true)
            }
            _ => Err(Error::new(format!("expected `,` or `{}`", close as char))),
        }
    }
}

impl<'de> de::SeqAccess<'de> for Access<'_, 'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if !self.has_next(b']')? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.de).map(Some)
    }
}

impl<'de> de::MapAccess<'de> for Access<'_, 'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if !self.has_next(b'}')? {
            return Ok(None);
        }
        self.de.key(seed).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(&mut *self.de)
    }
}

/// The `{"Name": value}` form of an enum.
struct Variant<'a, 'de> {
    de: &'a mut Deserializer<'de>,
}

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let name = self.de.key(seed)?;
        Ok((name, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        de::Deserialize::deserialize(&mut *self.de)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(&mut *self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(&mut *self.de, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_map(&mut *self.de, visitor)
    }
}

/// Byte scanning: stepping over whitespace, literals and whole values, and where a string or a
/// number ends.
mod scan {
    use super::{Error, Nesting};

    /// Steps over the value at `*pos` (after whitespace) and leaves `*pos` just past it, or,
    /// on an error, at the token that broke the grammar. The loop keeps its place in a local:
    /// skipping is most of the time spent reading a review.
    pub fn skip(bytes: &[u8], pos: &mut usize) -> Result<(), Error> {
        let mut nesting = Nesting::default();
        let mut i = *pos;
        let skipped = 'value: loop {
            i = after_ws(bytes, i);
            let stepped = match bytes.get(i) {
                Some(b'"') => string_end(bytes, i + 1).map(|(end, _)| i = end + 1),
                Some(&open @ (b'{' | b'[')) => {
                    let is_object = open == b'{';
                    let close = if is_object { b'}' } else { b']' };
                    let inside = after_ws(bytes, i + 1);
                    if bytes.get(inside) == Some(&close) {
                        i = inside + 1;
                        Ok(())
                    } else {
                        i = inside;
                        nesting.push(is_object);
                        match is_object.then(|| key(bytes, &mut i)) {
                            Some(Err(e)) => break 'value Err(e),
                            _ => continue 'value,
                        }
                    }
                }
                Some(b't') => literal(bytes, &mut i, b"true"),
                Some(b'f') => literal(bytes, &mut i, b"false"),
                Some(b'n') => literal(bytes, &mut i, b"null"),
                Some(b'-' | b'0'..=b'9') => number_end(bytes, i).map(|(end, _)| i = end),
                Some(_) => Err(Error::new("expected value")),
                None => Err(Error::new("EOF while parsing a value")),
            };
            if let Err(e) = stepped {
                break Err(e);
            }
            // After a value: close what ends here, or go on to the next element.
            loop {
                let Some(in_object) = nesting.top() else {
                    break 'value Ok(());
                };
                i = after_ws(bytes, i);
                match (bytes.get(i), in_object) {
                    (Some(b','), true) => {
                        i += 1;
                        match key(bytes, &mut i) {
                            Ok(()) => continue 'value,
                            Err(e) => break 'value Err(e),
                        }
                    }
                    (Some(b','), false) => {
                        i += 1;
                        continue 'value;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        i += 1;
                        nesting.pop();
                    }
                    (None, _) => {
                        break 'value Err(Error::new("EOF while parsing a list or an object"));
                    }
                    (_, true) => break 'value Err(Error::new("expected `,` or `}`")),
                    (_, false) => break 'value Err(Error::new("expected `,` or `]`")),
                }
            }
        };
        *pos = i;
        skipped
    }

    /// Steps over `"key":` inside an object being skipped.
    #[inline(always)]
    fn key(bytes: &[u8], i: &mut usize) -> Result<(), Error> {
        *i = after_ws(bytes, *i);
        match bytes.get(*i) {
            Some(b'"') => *i = string_end(bytes, *i + 1)?.0 + 1,
            Some(_) => return Err(Error::new("key must be a string")),
            None => return Err(Error::new("EOF while parsing an object")),
        }
        *i = after_ws(bytes, *i);
        match bytes.get(*i) {
            Some(b':') => {
                *i += 1;
                Ok(())
            }
            found => Err(Error::expected("`:`", found.is_none())),
        }
    }

    /// Steps over `word` (`true`, `false` or `null`), which must come next.
    #[inline(always)]
    pub fn literal(bytes: &[u8], i: &mut usize, word: &[u8]) -> Result<(), Error> {
        match bytes[*i..].starts_with(word) {
            true => {
                *i += word.len();
                Ok(())
            }
            false => Err(Error::new("expected value")),
        }
    }

    /// The first index at or after `i` that is not JSON whitespace.
    #[inline(always)]
    pub fn after_ws(bytes: &[u8], mut i: usize) -> usize {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = bytes.get(i) {
            i += 1;
        }
        i
    }

    /// Where the string whose contents start at `start` ends (the index of its closing quote),
    /// and whether it holds escapes. Refuses control characters and malformed escapes.
    #[inline(always)]
    pub fn string_end(bytes: &[u8], start: usize) -> Result<(usize, bool), Error> {
        let i = special(bytes, start);
        match bytes.get(i) {
            Some(b'"') => Ok((i, false)),
            _ => escaped_string_end(bytes, i),
        }
    }

    /// The rest of `string_end` from the first byte that is not a closing quote: escapes,
    /// and the errors.
    #[inline(never)]
    fn escaped_string_end(bytes: &[u8], mut i: usize) -> Result<(usize, bool), Error> {
        let mut escaped = false;
        loop {
            i = special(bytes, i);
            match bytes.get(i) {
                Some(b'"') => return Ok((i, escaped)),
                Some(b'\\') => {
                    escaped = true;
                    i += match bytes.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 2,
                        Some(b'u') => match bytes.get(i + 2..i + 6) {
                            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => 6,
                            Some(_) => return Err(Error::new("invalid escape")),
                            None => return Err(Error::new("EOF while parsing a string")),
                        },
                        Some(_) => return Err(Error::new("invalid escape")),
                        None => return Err(Error::new("EOF while parsing a string")),
                    }
                }
                Some(_) => {
                    return Err(Error::new(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ));
                }
                None => return Err(Error::new("EOF while parsing a string")),
            }
        }
    }

    /// The index of the first `"`, `\` or control character at or after `i`, or `bytes.len()`.
    /// Eight bytes at a time: a byte of `x` is zero exactly where `has_zero` sets its top bit.
    #[inline(always)]
    fn special(bytes: &[u8], mut i: usize) -> usize {
        const ONES: u64 = u64::from_le_bytes([1; 8]);
        const TOPS: u64 = u64::from_le_bytes([0x80; 8]);
        let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & TOPS;
        while let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            let word = u64::from_le_bytes(word);
            // A byte below 0x20 is one whose value minus 0x20 borrows (its top bit set while
            // the byte's own top bit is clear); a false hit can only follow a true one.
            let control = word.wrapping_sub(ONES * 0x20) & !word & TOPS;
            let hits = has_zero(word ^ (ONES * u64::from(b'"')))
                | has_zero(word ^ (ONES * u64::from(b'\\')))
                | control;
            if hits != 0 {
                return i + (hits.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while let Some(&b) = bytes.get(i) {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            i += 1;
        }
        i
    }

    /// Where the number starting at `start` ends, and whether it is an integer (no fraction,
    /// no exponent). Follows JSON's grammar: no leading zeros, no `+`, digits after `.` and `e`.
    pub fn number_end(bytes: &[u8], start: usize) -> Result<(usize, bool), Error> {
        let digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
        let invalid = || Error::new("invalid number");
        let mut i = start;
        if bytes.get(i) == Some(&b'-') {
            i += 1;
        }
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while digit(i) {
                    i += 1;
                }
            }
            _ => return Err(invalid()),
        }
        let mut integer = true;
        if bytes.get(i) == Some(&b'.') {
            integer = false;
            i += 1;
            if !digit(i) {
                return Err(invalid());
            }
            while digit(i) {
                i += 1;
            }
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            integer = false;
            i += 1;
            if matches!(bytes.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digit(i) {
                return Err(invalid());
            }
            while digit(i) {
                i += 1;
            }
        }
        Ok((i, integer))
    }
}

#[cfg(test)]
mod tests {
    use serde::de::IgnoredAny;
    use serde_json::Value;

    use super::*;

    const BODIES: [&str; 6] = [
        include_str!("../tests/fixtures/admission/pod-create-pinned.json"),
        include_str!("../tests/fixtures/admission/deployment-create-tagged.json"),
        include_str!("../tests/fixtures/admission/pod-update-image.json"),
        include_str!("../tests/fixtures/admission/exec.json"),
        include_str!("../benches/load/fixtures/pod-create.json"),
        include_str!("../benches/load/fixtures/deployment-create.json"),
    ];

    /// Both readers accept `text` or both refuse it, and read the same value from it.
    fn agree(text: &str) {
        let ours = from_str::<Value>(text);
        let theirs = serde_json::from_str::<Value>(text);
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text:?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{text:?}: fixity {ours:?}, serde_json {theirs:?}"),
        }
        let skipped = from_str::<IgnoredAny>(text).is_ok();
        assert_eq!(
            skipped,
            serde_json::from_str::<IgnoredAny>(text).is_ok(),
            "skipping {text:?}"
        );
    }

    #[test]
    fn reads_real_reviews_as_serde_json_does() {
        for body in BODIES {
            agree(body);
            let compact = serde_json::to_string(&serde_json::from_str::<Value>(body).unwrap());
            agree(&compact.unwrap());
        }
    }

    /// Every ASCII byte of a real review replaced by each byte that means something to a
    /// JSON reader, and every truncation: both readers must accept and refuse the same texts.
    #[test]
    fn refuses_what_serde_json_refuses() {
        const BYTES: &[u8] = b"\"\\{}[],:0-+.eEnt u/\x01\x7f";
        // The whole exec review, and a sample of the pod (the whole would take minutes unoptimised).
        for (body, step) in [(BODIES[3], 1), (BODIES[4], 13)] {
            let bytes = body.as_bytes();
            for i in (0..bytes.len())
                .step_by(step)
                .filter(|i| bytes[*i].is_ascii())
            {
                agree(&body[..i]);
                for &b in BYTES {
                    let mut mutated = bytes.to_vec();
                    mutated[i] = b;
                    agree(std::str::from_utf8(&mutated).unwrap());
                }
            }
        }
    }

    #[test]
    fn strings_escapes_and_numbers_match_serde_json() {
        let cases = [
            r#""plain""#,
            r#""tab\tquote\"slash\/back\\""#,
            r#""\u00e9\u4e2d\ud83d\ude00""#,
            r#""\ud83d""#,
            r#""\ud83dx""#,
            r#""\ud83d\u0041""#,
            r#""\ude00""#,
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\x""#,
            "\"a\u{1}b\"",
            "\"new\nline\"",
            r#""unterminated"#,
            "\"é, ü and 中\"",
            "0",
            "-0",
            "01",
            "-",
            "1.",
            "1.5",
            ".5",
            "1e",
            "1e+",
            "1e-7",
            "1E9",
            "+1",
            "1e400",
            "-1e400",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123abc",
            "true",
            "tru",
            "false",
            "null",
            "nul",
            "nullx",
            "[]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{}",
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{1:1}"#,
            r#"{"a":1"b":2}"#,
            " \t\r\n[ 1 , { \"k\" : [ ] } ] \n",
            "[1] x",
            "",
            "   ",
            r#"{"a":{"b":[{"c":null}]}}"#,
        ];
        for case in cases {
            agree(case);
        }
    }

    #[test]
    fn nesting_is_limited_where_serde_json_limits_it() {
        for depth in [126, 127, 128, 129, 10_000] {
            for (open, close) in [("[", "]"), (r#"{"a":"#, "}")] {
                agree(&format!("{}1{}", open.repeat(depth), close.repeat(depth)));
                agree(&format!("{}1", open.repeat(depth)));
            }
        }
    }

    #[test]
    fn skipping_tracks_mixed_nesting_across_its_word_boundaries() {
        // Objects and arrays in an irregular order, deep enough to spill `Nesting`'s word
        // once or twice; then the same with one closing bracket of the wrong kind.
        for depth in [63, 64, 65, 127, 128, 129, 200] {
            let kinds: Vec<bool> = (0..depth).map(|i| (i * 7 + i / 3) % 5 < 2).collect();
            let open: String = kinds
                .iter()
                .map(|&object| if object { r#"{"k":"# } else { "[" })
                .collect();
            let close: Vec<&str> = kinds
                .iter()
                .rev()
                .map(|&object| if object { "}" } else { "]" })
                .collect();
            agree(&format!("{open}1{}", close.concat()));
            for wrong in [0, depth / 2, depth - 1] {
                let mut close = close.clone();
                close[wrong] = if close[wrong] == "}" { "]" } else { "}" };
                agree(&format!("{open}1{}", close.concat()));
            }
        }
    }

    #[test]
    fn raw_values_are_kept_as_written() {
        #[derive(serde::Deserialize)]
        struct Holder<'a> {
            #[serde(borrow)]
            raw: RawJson<'a>,
            after: u8,
        }
        let text = r#"{"raw": {"a": [1, "x\"y"], "b": null} , "after": 7}"#;
        let holder: Holder<'_> = from_str(text).unwrap();
        assert_eq!(holder.raw.get(), r#"{"a": [1, "x\"y"], "b": null}"#);
        assert_eq!(holder.after, 7);
        assert!(
            serde_json::from_str::<Holder<'_>>(text).is_err(),
            "serde_json has no raw form"
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = from_str::<Value>("{\n  \"a\": tru\n}")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "expected value at line 2 column 8");
        let e = from_str::<Vec<u8>>("[1, 300]").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid value: integer `300`, expected u8"),
            "{e}"
        );
    }

    #[test]
    fn enums_read_as_serde_json_reads_them() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        enum Shape {
            Dot,
            Line(u8),
            Box { w: u8 },
        }
        for text in [
            r#""Dot""#,
            r#"{"Line":3}"#,
            r#"{"Box":{"w":2}}"#,
            r#""Cube""#,
            r#"{"Line":3,"x":1}"#,
            r#"{1:3}"#,
            r#"{}"#,
            r#"{"Line" 3}"#,
        ] {
            let ours = from_str::<Shape>(text).ok();
            assert_eq!(ours, serde_json::from_str::<Shape>(text).ok(), "{text}");
        }
    }
}
