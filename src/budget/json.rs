//! A small JSON reader for the few keys the LLM cost reads (`model`, `max_tokens`,
//! `usage`), so that no JSON library is a dependency of every user of the layer.
//!
//! It walks a document once, without allocating: values it does not need are skipped
//! (strings, numbers, literals, and nested arrays and objects up to [`MAX_DEPTH`] levels,
//! their brackets matched). Malformed input is `None`, never a panic; every loop consumes
//! input or returns, so the work is linear in the bytes read.

/// The deepest nesting skipped; deeper documents are refused (no LLM request nests this deep).
const MAX_DEPTH: usize = 128;

/// A cursor over one JSON document.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// Only whitespace is left.
    pub(super) fn end(&mut self) -> Option<()> {
        (self.peek().is_none()).then_some(())
    }

    /// A string's raw bytes between its quotes (escapes left as they are).
    fn string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => {
                    let s = self.bytes.get(start..self.at)?;
                    self.at += 1;
                    return Some(s);
                }
                b'\\' => {
                    self.bytes.get(self.at + 1)?;
                    self.at += 2;
                }
                c if c < 0x20 => return None,
                _ => self.at += 1,
            }
        }
    }

    /// A number or a literal (`true`, `false`, `null`), as written.
    fn scalar(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let start = self.at;
        while let Some(&c) = self.bytes.get(self.at) {
            if matches!(c, b',' | b'}' | b']' | b':' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.at += 1;
        }
        let s = self.bytes.get(start..self.at)?;
        let number = matches!(s.first(), Some(b'-' | b'0'..=b'9'))
            && s.iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'));
        (number || matches!(s, b"true" | b"false" | b"null")).then_some(s)
    }

    /// Skips one value, whatever it is.
    pub(super) fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut closers = [0u8; MAX_DEPTH];
                let mut depth = 0;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                        }
                        c @ (b'{' | b'[') => {
                            *closers.get_mut(depth)? = if c == b'{' { b'}' } else { b']' };
                            depth += 1;
                            self.at += 1;
                        }
                        c @ (b'}' | b']') => {
                            depth = depth.checked_sub(1)?;
                            if closers.get(depth) != Some(&c) {
                                return None;
                            }
                            self.at += 1;
                            if depth == 0 {
                                return Some(());
                            }
                        }
                        b',' | b':' => self.at += 1,
                        _ => {
                            self.scalar()?;
                        }
                    }
                }
            }
            _ => self.scalar().map(drop),
        }
    }

    /// Reads an object, handing each member's key to `member`, which reads (or skips) the
    /// member's value.
    pub(super) fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        if !self.eat(b'{') {
            return None;
        }
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            member(self, key)?;
            if self.eat(b'}') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// An object, or any other value skipped (`"usage": null`).
    pub(super) fn object_or_skip(
        &mut self,
        member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        if self.peek() == Some(b'{') {
            self.object(member)
        } else {
            self.skip()
        }
    }

    /// A string value (`Some(None)`: another value, skipped).
    pub(super) fn string_value(&mut self) -> Option<Option<&'a [u8]>> {
        if self.peek() == Some(b'"') {
            self.string().map(Some)
        } else {
            self.skip().map(|()| None)
        }
    }

    /// A count: a non-negative integer, saturating at `u64::MAX` (`Some(None)`: another
    /// value — null, a fraction, a negative number, a string — skipped, so absent).
    pub(super) fn count(&mut self) -> Option<Option<u64>> {
        if matches!(self.peek(), Some(b'0'..=b'9')) {
            let digits = self.scalar()?;
            if digits.iter().all(u8::is_ascii_digit) {
                let n = digits.iter().fold(0u64, |n, d| {
                    n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                });
                return Some(Some(n));
            }
            return Some(None);
        }
        self.skip().map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::Reader;

    fn skips(text: &str) -> bool {
        let mut r = Reader::new(text.as_bytes());
        r.skip().and_then(|()| r.end()).is_some()
    }

    #[test]
    fn skips_what_is_json_and_refuses_what_is_not() {
        for ok in [
            r#"{"a":[1,2,{"b":"x\"}"}],"c":null,"d":-1.5e3,"e":true}"#,
            "[]",
            "{}",
            r#""\\""#,
            " 12 ",
        ] {
            assert!(skips(ok), "{ok}");
        }
        for bad in [
            r#"{"a":[1,2}"#,
            "{",
            "]",
            r#"{"a":"unterminated}"#,
            "@",
            "",
            "{\"a\":\"\u{1}\"}",
        ] {
            assert!(!skips(bad), "{bad}");
        }
        // Past the depth cap: refused, not a stack overflow.
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(!skips(&deep));
    }

    #[test]
    fn counts_saturate_and_ignore_what_is_not_a_count() {
        let count = |text: &str| Reader::new(text.as_bytes()).count();
        assert_eq!(count("42"), Some(Some(42)));
        assert_eq!(count("99999999999999999999999999"), Some(Some(u64::MAX)));
        assert_eq!(count("-5"), Some(None));
        assert_eq!(count("1.5"), Some(None));
        assert_eq!(count("null"), Some(None));
        assert_eq!(count(r#""7""#), Some(None));
        assert_eq!(count("{"), None);
    }
}
