//! [`LlmCost`]: the cost of an LLM call from its body, priced per model; and the usage a
//! response reports, priced the same way.

use std::sync::Arc;

use super::json::Reader;

/// Prices LLM calls for the cost budgets: an estimate of a retry before it is sent (from
/// the request body), and what it really cost once answered (from the response's `usage`).
/// Integer arithmetic only: prices are units (yours: tokens, micro-dollars) per million
/// tokens, and every cost is rounded up.
///
/// **The estimate** ([`LlmCost::estimate`]; the layer's, with
/// [`RetryLayer::llm_cost`](crate::RetryLayer::llm_cost)) reads a JSON request body
/// (OpenAI chat completions and Responses, Anthropic messages, and their look-alikes):
///
/// - input tokens: the body's length in bytes divided by
///   [`chars_per_token`](LlmCost::chars_per_token) (default 4), rounded up. The whole body,
///   not only the prompt's text: tools, system prompt and JSON syntax are sent too, so the
///   estimate errs high (a reservation is a worst case; the settlement gives the rest back).
///   Text that takes more than one token per 4 bytes (some scripts) errs low: set a smaller
///   ratio for it.
/// - output tokens: the largest of `max_tokens`, `max_output_tokens` and
///   `max_completion_tokens`, else [`default_max_tokens`](LlmCost::default_max_tokens)
///   (default 4096). A value that is not a non-negative integer counts as absent; a huge
///   one saturates (and no cost budget will fit it).
/// - the price: the `model`'s, from the table ([`model`](LlmCost::model)): an exact name,
///   else the longest name in the table that starts the model's (`gpt-4o-mini` prices
///   `gpt-4o-mini-2024-07-18`, `gpt-4o` prices `gpt-4o-2024-08-06`); else the
///   [`fallback`](LlmCost::fallback) price. **Without a fallback, an unknown model has no
///   estimate**: its retries are not charged to the cost budgets, like any retry of unknown
///   cost.
///
/// No estimate (the retry is not charged to the cost budgets) for a body that is not one
/// JSON object, or longer than [`max_body_bytes`](LlmCost::max_body_bytes) (default
/// 32 MiB, the largest request the big providers accept): the work is bounded and linear,
/// done only when a retry is considered, never on the success path. A request whose
/// body the layer cannot see (a stream) has no estimate either; give such requests a
/// [`Cost`](super::Cost).
///
/// **The usage** ([`LlmCost::usage_cost`], and [`UsageBody`](super::UsageBody) while a
/// response streams) is read from a JSON body or a server-sent event stream: OpenAI chat
/// completions' `usage.prompt_tokens` and `completion_tokens` (in the final chunk of a
/// stream sent with `stream_options.include_usage`), the Responses API's `usage.input_tokens`
/// and `output_tokens` (in `response.completed` when streamed), Anthropic's
/// `usage.input_tokens` and `output_tokens` (in `message_start` and `message_delta` when
/// streamed). Anthropic's `cache_creation_input_tokens` and `cache_read_input_tokens` are
/// counted as input tokens at the input price (cache reads really cost less and cache
/// writes more: they are not priced apart). The model is the response's `model`.
///
/// ```
/// use tower_retry_guard::budget::LlmCost;
///
/// // Micro-dollars per million tokens (input, output), and for other models.
/// let prices = LlmCost::new()
///     .model("gpt-4o", 2_500_000, 10_000_000)
///     .model("gpt-4o-mini", 150_000, 600_000)
///     .fallback(5_000_000, 15_000_000);
/// let body = br#"{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
/// // 84 bytes -> 21 input tokens, 1000 output tokens: 3.15 + 600 micro-dollars, rounded up.
/// assert_eq!(prices.estimate(body), Some(604));
/// let usage = br#"{"model":"gpt-4o-mini-2024-07-18","usage":{"prompt_tokens":9,"completion_tokens":12}}"#;
/// assert_eq!(prices.usage_cost(usage), Some(9));
/// // For tokens as the unit: one unit a token, whatever the model.
/// let tokens = LlmCost::new().fallback(1_000_000, 1_000_000);
/// assert_eq!(tokens.price(None, 100, 50), Some(150));
/// ```
#[derive(Debug, Clone)]
pub struct LlmCost {
    table: Arc<Table>,
}

#[derive(Debug, Clone)]
struct Table {
    /// (model, input, output), in units per million tokens.
    models: Vec<(String, u64, u64)>,
    fallback: Option<(u64, u64)>,
    chars_per_token: u64,
    default_max_tokens: u64,
    max_body_bytes: usize,
}

impl Default for LlmCost {
    fn default() -> Self {
        LlmCost::new()
    }
}

impl LlmCost {
    /// An empty table (no model priced, no fallback): add prices with [`LlmCost::model`]
    /// and [`LlmCost::fallback`].
    pub fn new() -> Self {
        LlmCost {
            table: Arc::new(Table {
                models: Vec::new(),
                fallback: None,
                chars_per_token: 4,
                default_max_tokens: 4096,
                max_body_bytes: 32 << 20,
            }),
        }
    }

    fn table(&mut self) -> &mut Table {
        Arc::make_mut(&mut self.table)
    }

    /// The price of a model: `input` and `output` units per million tokens. A model priced
    /// twice keeps the last price.
    pub fn model(mut self, name: impl Into<String>, input: u64, output: u64) -> Self {
        let name = name.into();
        let models = &mut self.table().models;
        models.retain(|(n, ..)| *n != name);
        models.push((name, input, output));
        self
    }

    /// The price of models not in the table (default: none, and no estimate for them).
    pub fn fallback(mut self, input: u64, output: u64) -> Self {
        self.table().fallback = Some((input, output));
        self
    }

    /// Bytes of request body per input token, for the estimate (default 4; at least 1).
    pub fn chars_per_token(mut self, bytes: u64) -> Self {
        self.table().chars_per_token = bytes.max(1);
        self
    }

    /// The output tokens of a request that names no maximum (default 4096).
    pub fn default_max_tokens(mut self, tokens: u64) -> Self {
        self.table().default_max_tokens = tokens;
        self
    }

    /// The longest request body estimated (default 32 MiB); a longer one has no estimate.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.table().max_body_bytes = bytes;
        self
    }

    /// The price of `input` and `output` tokens of `model` (`None`: the fallback price),
    /// rounded up; `None` when the model has no price. Saturates at `u64::MAX`.
    pub fn price(&self, model: Option<&str>, input: u64, output: u64) -> Option<u64> {
        let (pi, po) = self.prices_of(model)?;
        let micro = (u128::from(input) * u128::from(pi))
            .saturating_add(u128::from(output) * u128::from(po));
        Some(u64::try_from(micro.div_ceil(1_000_000)).unwrap_or(u64::MAX))
    }

    fn prices_of(&self, model: Option<&str>) -> Option<(u64, u64)> {
        let table = &self.table;
        let found = model.and_then(|model| {
            table
                .models
                .iter()
                .filter(|(name, ..)| model.starts_with(name.as_str()))
                .max_by_key(|(name, ..)| name.len())
        });
        found.map(|(_, i, o)| (*i, *o)).or(table.fallback)
    }

    /// The estimated cost of one attempt of a JSON request `body` (see the type's docs);
    /// `None` when it cannot be estimated.
    pub fn estimate(&self, body: &[u8]) -> Option<u64> {
        let table = &self.table;
        if body.len() > table.max_body_bytes {
            return None;
        }
        let (mut model, mut max_out) = (None, None);
        let mut reader = Reader::new(body);
        reader.object(|r, key| match key {
            b"model" => {
                model = r.string_value()?;
                Some(())
            }
            b"max_tokens" | b"max_output_tokens" | b"max_completion_tokens" => {
                if let Some(n) = r.count()? {
                    max_out = Some(max_out.map_or(n, |m: u64| m.max(n)));
                }
                Some(())
            }
            _ => r.skip(),
        })?;
        reader.end()?;
        let input = (body.len() as u64).div_ceil(table.chars_per_token);
        let output = max_out.unwrap_or(table.default_max_tokens);
        let model = model.and_then(|m| std::str::from_utf8(m).ok());
        self.price(model, input, output)
    }

    /// The cost of the usage a response body reports (a JSON body, or a whole
    /// `text/event-stream`; see the type's docs), priced for the response's model; `None`
    /// when it reports no usage, or its model has no price. For a body that streams, wrap
    /// it in a [`UsageBody`](super::UsageBody) instead.
    pub fn usage_cost(&self, body: &[u8]) -> Option<u64> {
        let mut scan = UsageScan::default();
        scan.feed(body);
        scan.finish();
        scan.cost(self)
    }
}

/// The most bytes a usage scan keeps: of a JSON body, of one event of a stream, of one
/// line of it. Past it, that body or event is not read (no settlement from it).
const SCAN_CAP: usize = 4 << 20;

/// The usage reported so far; each count the largest seen (Anthropic's stream reports
/// output tokens cumulatively, in several events).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Usage {
    model: Option<String>,
    input: Option<u64>,
    output: Option<u64>,
    cache_write: Option<u64>,
    cache_read: Option<u64>,
}

fn raise(slot: &mut Option<u64>, n: Option<u64>) {
    if let Some(n) = n {
        *slot = Some(slot.map_or(n, |m| m.max(n)));
    }
}

impl Usage {
    fn model(&mut self, name: Option<&[u8]>) {
        if let Some(name) = name.filter(|n| n.len() <= 256) {
            if let Ok(name) = std::str::from_utf8(name) {
                // Every chunk of an OpenAI stream names it: allocated once.
                if self.model.as_deref() != Some(name) {
                    self.model = Some(name.to_owned());
                }
            }
        }
    }

    /// The `usage` object's counts.
    fn counts(&mut self, r: &mut Reader<'_>) -> Option<()> {
        r.object_or_skip(|r, key| {
            let slot = match key {
                b"prompt_tokens" | b"input_tokens" => &mut self.input,
                b"completion_tokens" | b"output_tokens" => &mut self.output,
                b"cache_creation_input_tokens" => &mut self.cache_write,
                b"cache_read_input_tokens" => &mut self.cache_read,
                _ => return r.skip(),
            };
            raise(slot, r.count()?);
            Some(())
        })
    }

    /// One JSON document: `usage` and `model` at its top level, or in its `message`
    /// (Anthropic's `message_start`) or `response` (the Responses API's events).
    fn document(&mut self, text: &[u8]) -> Option<()> {
        let mut r = Reader::new(text);
        r.object(|r, key| match key {
            b"usage" => self.counts(r),
            b"model" => {
                self.model(r.string_value()?);
                Some(())
            }
            b"message" | b"response" => r.object_or_skip(|r, key| match key {
                b"usage" => self.counts(r),
                b"model" => {
                    self.model(r.string_value()?);
                    Some(())
                }
                _ => r.skip(),
            }),
            _ => r.skip(),
        })?;
        r.end()
    }
}

/// How a response body is read, decided by its first byte that is not whitespace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    #[default]
    Unknown,
    /// `{`: one JSON document, read at the end.
    Json,
    /// Anything else: server-sent events, read line by line.
    Events,
    /// Past the cap, or not contiguous: nothing more is read.
    Off,
}

/// Reads usage from a response body fed in chunks, with bounded memory.
#[derive(Debug, Default)]
pub(super) struct UsageScan {
    mode: Mode,
    /// The JSON body so far, or the current line of an event stream.
    buf: Vec<u8>,
    /// The current line was too long: skip it up to its end.
    skipping_line: bool,
    /// The `data` of the current event.
    event: Vec<u8>,
    usage: Usage,
}

impl UsageScan {
    pub(super) fn feed(&mut self, chunk: &[u8]) {
        if self.mode == Mode::Unknown {
            match chunk.iter().find(|c| !c.is_ascii_whitespace()) {
                None => return,
                Some(b'{') => self.mode = Mode::Json,
                Some(_) => self.mode = Mode::Events,
            }
        }
        match self.mode {
            Mode::Json => {
                if self.buf.len().saturating_add(chunk.len()) > SCAN_CAP {
                    self.stop();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            Mode::Events => self.lines(chunk),
            Mode::Unknown | Mode::Off => {}
        }
    }

    /// Nothing more is read (and nothing kept).
    pub(super) fn stop(&mut self) {
        self.mode = Mode::Off;
        self.buf = Vec::new();
        self.event = Vec::new();
    }

    fn lines(&mut self, mut chunk: &[u8]) {
        // Each turn consumes up to one line end of the chunk.
        while !chunk.is_empty() {
            let (part, rest, ended) = match chunk.iter().position(|&c| c == b'\n') {
                Some(at) => (&chunk[..at], &chunk[at + 1..], true),
                None => (chunk, &[][..], false),
            };
            chunk = rest;
            if !self.skipping_line {
                if self.buf.len().saturating_add(part.len()) > SCAN_CAP {
                    self.buf.clear();
                    self.skipping_line = true;
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if ended {
                if !std::mem::take(&mut self.skipping_line) {
                    let line = std::mem::take(&mut self.buf);
                    self.line(&line);
                    self.buf = line;
                }
                self.buf.clear();
            }
        }
    }

    /// One line of an event stream (its `\n` removed).
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch();
        } else if let Some(data) = line.strip_prefix(b"data:") {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if self.event.len().saturating_add(data.len() + 1) > SCAN_CAP {
                // An event too big to read: dropped whole.
                self.event.clear();
                self.event.extend_from_slice(b"-");
            } else {
                if !self.event.is_empty() {
                    self.event.push(b'\n');
                }
                self.event.extend_from_slice(data);
            }
        }
        // `event:`, `id:`, `retry:` and comments say nothing about usage.
    }

    fn dispatch(&mut self) {
        if !self.event.is_empty() {
            // `[DONE]` and anything else that is not an object are not usage.
            let _ = self.usage.document(&self.event);
            self.event.clear();
        }
    }

    /// The body ended.
    pub(super) fn finish(&mut self) {
        match self.mode {
            Mode::Json => {
                let _ = self.usage.document(&self.buf);
            }
            Mode::Events => {
                if !self.skipping_line && !self.buf.is_empty() {
                    let line = std::mem::take(&mut self.buf);
                    self.line(&line);
                }
                self.dispatch();
            }
            Mode::Unknown | Mode::Off => {}
        }
        self.buf = Vec::new();
        self.event = Vec::new();
    }

    /// The cost of the usage read, if any (both counts reported, the model priced).
    pub(super) fn cost(&self, prices: &LlmCost) -> Option<u64> {
        let u = &self.usage;
        let input = u
            .input?
            .saturating_add(u.cache_write.unwrap_or(0))
            .saturating_add(u.cache_read.unwrap_or(0));
        prices.price(u.model.as_deref(), input, u.output?)
    }
}

#[cfg(test)]
#[path = "llm_tests.rs"]
mod tests;
