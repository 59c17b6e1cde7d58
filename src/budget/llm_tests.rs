//! Unit tests of the LLM cost estimate and usage reading.

use super::*;

fn tokens() -> LlmCost {
    LlmCost::new().fallback(1_000_000, 1_000_000)
}

#[test]
fn prices_round_up_and_pick_the_longest_prefix() {
    let p = LlmCost::new().model("gpt-4o", 2_500_000, 10_000_000).model(
        "gpt-4o-mini",
        150_000,
        600_000,
    );
    assert_eq!(p.price(Some("gpt-4o-mini-2024-07-18"), 1, 0), Some(1));
    assert_eq!(
        p.price(Some("gpt-4o-2024-08-06"), 1_000_000, 1),
        Some(2_500_010)
    );
    assert_eq!(p.price(Some("claude"), 1, 1), None);
    assert_eq!(p.price(None, 1, 1), None);
    assert_eq!(
        tokens()
            .model("x", u64::MAX, u64::MAX)
            .price(Some("x"), u64::MAX, u64::MAX),
        Some(u64::MAX)
    );
}

#[test]
fn estimates_from_the_body_length_and_the_max_output() {
    let body = br#"{"messages":[{"role":"user","content":"hello"}],"max_completion_tokens":100,"max_tokens":50}"#;
    let input = (body.len() as u64).div_ceil(4);
    assert_eq!(tokens().estimate(body), Some(input + 100));
    let body = br#"{"input":"hi","max_tokens":null}"#;
    assert_eq!(tokens().estimate(body), Some(8 + 4096));
    assert_eq!(
        tokens()
            .default_max_tokens(0)
            .chars_per_token(0)
            .estimate(body),
        Some(32)
    );
    for bad in [&b"not json"[..], b"[1,2]", b"{\"a\":1", b"{\"a\":1} x", b""] {
        assert_eq!(tokens().estimate(bad), None);
    }
    assert_eq!(tokens().max_body_bytes(10).estimate(body), None);
}

fn scan(chunks: &[&[u8]]) -> Option<u64> {
    let mut s = UsageScan::default();
    for c in chunks {
        s.feed(c);
    }
    s.finish();
    s.cost(&tokens())
}

#[test]
fn reads_usage_from_json_and_event_streams_split_anywhere() {
    let anthropic = b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\r\n\r\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
    for split in 0..anthropic.len() {
        let (a, b) = anthropic.split_at(split);
        assert_eq!(scan(&[a, b]), Some(45), "split at {split}");
    }
    let openai = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
    assert_eq!(scan(&[openai]), Some(10));
    let responses = br#"{"id":"r","response":{"usage":{"input_tokens":4,"output_tokens":6}}}"#;
    assert_eq!(scan(&[responses]), Some(10));
    assert_eq!(scan(&[b"{\"usage\":{\"prompt_tokens\":7}}"]), None);
    assert_eq!(scan(&[b"{\"usage\":"]), None);
    assert_eq!(scan(&[b"data: {\"usage\":{\"input_tokens\":1,"]), None);
}
