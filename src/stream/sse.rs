//! An incremental server-sent-events scanner: finds the first content event, counts the
//! content events after it, and recognises providers' in-band error events.
//!
//! It never copies more than a few KiB of any line or event: a huge delta costs a scan,
//! not memory.

use std::sync::Arc;

use super::error::InBandError;
use crate::classify::{ErrorKind, LlmHttp};

/// The head of a line kept across frames (a field name and the start of its value).
const LINE_CAP: usize = 4 * 1024;
/// The head of an event's data kept to recognise and map an error.
const DATA_CAP: usize = 4 * 1024;
/// The longest event name kept (longer names are never ours to recognise).
const EVENT_CAP: usize = 64;

/// What the stream has shown so far.
#[derive(Debug)]
pub(crate) struct Scanner {
    /// The head of a line that continues in the next frame.
    line: Vec<u8>,
    /// Whether `line` holds a line in progress (possibly empty so far after a `\r`).
    partial: bool,
    /// The last chunk ended with a `\r`: a `\n` that starts the next one ends the same line.
    skip_lf: bool,
    /// Bytes seen yet (a byte order mark is ignored only at the very start).
    started: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// Content events seen.
    pub(crate) content: u64,
    /// The first error event and the content events seen before it.
    pub(crate) error: Option<(u64, InBandError)>,
    preamble: Arc<[Box<str>]>,
}

impl Scanner {
    pub(crate) fn new(preamble: Arc<[Box<str>]>) -> Self {
        Scanner {
            line: Vec::new(),
            partial: false,
            skip_lf: false,
            started: false,
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            content: 0,
            error: None,
            preamble,
        }
    }

    /// Reads a chunk of the stream. Stops at the first error event (what follows it is not
    /// looked at). Lines end with CRLF, LF or CR alone (the SSE grammar), a CRLF possibly
    /// cut between two chunks.
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) {
        if !self.started && !chunk.is_empty() {
            self.started = true;
            // One leading U+FEFF is ignored (the SSE grammar).
            chunk = chunk.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(chunk);
        }
        if std::mem::take(&mut self.skip_lf) {
            chunk = chunk.strip_prefix(b"\n").unwrap_or(chunk);
        }
        while !chunk.is_empty() && self.error.is_none() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    let head = &chunk[..i];
                    let mut end = i + 1;
                    if chunk[i] == b'\r' {
                        match chunk.get(end) {
                            Some(b'\n') => end += 1,
                            Some(_) => {}
                            None => self.skip_lf = true,
                        }
                    }
                    chunk = &chunk[end..];
                    if self.partial {
                        push_capped(&mut self.line, head, LINE_CAP);
                        let line = std::mem::take(&mut self.line);
                        self.on_line(&line);
                        self.line = line;
                        self.line.clear();
                        self.partial = false;
                    } else {
                        self.on_line(head);
                    }
                }
                None => {
                    push_capped(&mut self.line, chunk, LINE_CAP);
                    self.partial = true;
                    break;
                }
            }
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if line[0] == b':' {
            return; // a comment: `: keep-alive`
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    push_capped(&mut self.data, b"\n", DATA_CAP);
                }
                self.has_data = true;
                push_capped(&mut self.data, value, DATA_CAP);
            }
            b"event" => {
                self.event.clear();
                push_capped(&mut self.event, value, EVENT_CAP);
            }
            _ => {} // id, retry, unknown fields
        }
    }

    /// An empty line ends an event.
    fn dispatch(&mut self) {
        let event = self.event.as_slice();
        if event == b"error" || (self.has_data && is_error_json(&self.data)) {
            self.error = Some((self.content, map_error(&self.data)));
        } else if self.has_data && !self.is_keep_alive() {
            self.content += 1;
        }
        self.event.clear();
        self.data.clear();
        self.has_data = false;
    }

    fn is_keep_alive(&self) -> bool {
        let event = self.event.as_slice();
        event == b"ping"
            || self.preamble.iter().any(|p| p.as_bytes() == event)
            || first_key_value(&self.data, b"type") == Some(&b"ping"[..])
    }
}

fn push_capped(buf: &mut Vec<u8>, bytes: &[u8], cap: usize) {
    let room = cap.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    &s[n..]
}

/// A JSON string at the start of `s` (no escapes needed for the names we look for), and
/// what follows it.
fn json_string(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = s.strip_prefix(b"\"")?;
    let end = s.iter().position(|&b| b == b'"' || b == b'\\')?;
    if s[end] == b'\\' {
        return None;
    }
    Some((&s[..end], &s[end + 1..]))
}

/// The first key of a JSON object, and what follows its colon.
fn first_key(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = skip_ws(data).strip_prefix(b"{")?;
    let (key, rest) = json_string(skip_ws(s))?;
    let rest = skip_ws(rest).strip_prefix(b":")?;
    Some((key, skip_ws(rest)))
}

/// The string value of `data`'s first key when that key is `key`.
fn first_key_value<'a>(data: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let (k, rest) = first_key(data)?;
    if k != key {
        return None;
    }
    json_string(rest).map(|(v, _)| v)
}

/// OpenAI's `{"error": {...}}` and Anthropic's `{"type": "error", ...}`, recognised from the
/// first key only: a content event that merely mentions an error is content, and so is one
/// that says it has none (`{"error": null, "choices": ...}`).
fn is_error_json(data: &[u8]) -> bool {
    match first_key(data) {
        Some((b"error", value)) => !value.starts_with(b"null"),
        Some((b"type", rest)) => json_string(rest).is_some_and(|(v, _)| v == b"error"),
        _ => false,
    }
}

const QUOTA: [&[u8]; 4] = [
    b"insufficient_quota",
    b"billing_hard_limit_reached",
    b"quota_exceeded",
    b"billing_not_active",
];
const CLIENT: [&[u8]; 8] = [
    b"invalid_request_error",
    b"invalid_request",
    b"authentication_error",
    b"permission_error",
    b"not_found_error",
    b"request_too_large",
    b"invalid_api_key",
    b"context_length_exceeded",
];
const OVERLOADED: [&[u8]; 3] = [b"overloaded_error", b"overloaded", b"service_unavailable"];
const TIMEOUT: [&[u8]; 2] = [b"timeout", b"timeout_error"];

/// Maps an error event's data by the values of its `"type"` and `"code"` keys (at any
/// depth), most severe first: quota, client error, rate limit, overloaded, timeout; anything
/// else is a server error.
pub(crate) fn map_error(data: &[u8]) -> InBandError {
    let mut values: Vec<&[u8]> = Vec::new();
    for key in [&b"\"type\""[..], b"\"code\""] {
        let mut rest = data;
        // Bounded by the data's length (at most DATA_CAP): each step moves forward.
        while let Some(at) = rest.windows(key.len()).position(|w| w == key) {
            rest = &rest[at + key.len()..];
            let after = skip_ws(rest);
            if let Some(after) = after.strip_prefix(b":") {
                if let Some((value, _)) = json_string(skip_ws(after)) {
                    values.push(value);
                }
            }
            if values.len() >= 16 {
                break;
            }
        }
    }
    let has = |set: &[&[u8]]| values.iter().any(|v| set.iter().any(|s| v == s));
    let (kind, retryable) = if has(&QUOTA) || LlmHttp::is_quota_error(data) {
        (ErrorKind::QuotaExhausted, false)
    } else if has(&CLIENT) {
        (ErrorKind::ClientError, false)
    } else if values.iter().any(|v| v.starts_with(b"rate_limit")) {
        (ErrorKind::RateLimited, true)
    } else if has(&OVERLOADED) {
        (ErrorKind::Overloaded, true)
    } else if has(&TIMEOUT) {
        (ErrorKind::Timeout, true)
    } else {
        (ErrorKind::ServerError, true)
    };
    InBandError {
        kind,
        retryable,
        data: String::from_utf8_lossy(data).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&str]) -> Scanner {
        let mut s = Scanner::new(Arc::from(vec!["message_start".into()]));
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s
    }

    #[test]
    fn comments_pings_and_empty_lines_are_not_content() {
        let s = scan(&[
            ": keep-alive\n\n",
            "\n\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        ]);
        assert_eq!(s.content, 0);
        assert!(s.error.is_none());
        let s = scan(&["data: {\"type\":\"ping\"}\r\n\r\n"]);
        assert_eq!(s.content, 0);
    }

    #[test]
    fn content_is_counted_across_frame_boundaries() {
        let s = scan(&[
            "da",
            "ta: {\"choices\":[]}\n",
            "\ndata: x\n\n",
            "data: [DONE]\n\n",
        ]);
        assert_eq!(s.content, 3);
    }

    #[test]
    fn preamble_events_are_not_content() {
        let s = scan(&["event: message_start\ndata: {\"type\":\"message_start\"}\n\n"]);
        assert_eq!(s.content, 0);
    }

    #[test]
    fn openai_and_anthropic_error_events_are_mapped() {
        let s = scan(&[
            "data: {\"error\": {\"message\": \"busy\", \"type\": \"server_error\", \"code\": null}}\n\n",
        ]);
        let (before, e) = s.error.expect("an error event");
        assert_eq!(
            (before, e.kind, e.retryable),
            (0, ErrorKind::ServerError, true)
        );

        let s = scan(&[
            "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
        ]);
        assert_eq!(s.error.map(|e| e.1.kind), Some(ErrorKind::Overloaded));

        let s = scan(&[
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\"}}\n\n",
        ]);
        assert_eq!(s.error.map(|e| e.1.kind), Some(ErrorKind::RateLimited));

        let s = scan(&[
            "data: {\"error\":{\"type\":\"insufficient_quota\",\"code\":\"insufficient_quota\"}}\n\n",
        ]);
        let e = s.error.expect("an error event").1;
        assert_eq!((e.kind, e.retryable), (ErrorKind::QuotaExhausted, false));

        let s = scan(&[
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\"}}\n\n",
        ]);
        let e = s.error.expect("an error event").1;
        assert_eq!((e.kind, e.retryable), (ErrorKind::ClientError, false));
    }

    #[test]
    fn an_error_after_content_remembers_how_much_came_before() {
        let s = scan(&["data: a\n\ndata: b\n\nevent: error\ndata: {}\n\ndata: c\n\n"]);
        assert_eq!(s.error.map(|e| e.0), Some(2));
        assert_eq!(s.content, 2);
    }

    #[test]
    fn content_mentioning_errors_is_content() {
        let s = scan(&["data: {\"choices\":[{\"delta\":{\"content\":\"{\\\"error\\\"\"}}]}\n\n"]);
        assert_eq!(s.content, 1);
        assert!(s.error.is_none());
    }

    #[test]
    fn hostile_input_is_bounded() {
        let mut s = Scanner::new(Arc::from(Vec::new()));
        let big = vec![b'x'; 1 << 20];
        s.feed(b"data: ");
        s.feed(&big);
        s.feed(&big);
        assert!(s.line.len() <= LINE_CAP);
        s.feed(b"\n\n");
        assert_eq!(s.content, 1);
        assert!(s.data.capacity() <= 2 * DATA_CAP);
        s.feed(&[0xff, 0xfe, b'\n', b':', 0x80, b'\n', b'\n']);
        let e = map_error(&[0xff, b'"', b't', b'y', b'p', b'e', b'"', b':']);
        assert_eq!(e.kind, ErrorKind::ServerError);
    }
}
