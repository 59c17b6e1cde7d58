//! How a finished response is kept in Redis (see the key table in the module docs).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::server::Stored;
use crate::store::StoreError;

/// The encoding's version byte.
const STORED_V1: u8 = 1;

/// Encodes a response (see the module docs for the layout).
pub(super) fn encode_stored(stored: &Stored) -> Result<Vec<u8>, StoreError> {
    let too_big = |what: &str| StoreError::new(format!("response not storable: {what} too long"));
    let mut out = Vec::with_capacity(7 + stored.size() + 6 * stored.headers.len());
    out.push(STORED_V1);
    out.extend_from_slice(&stored.status.as_u16().to_be_bytes());
    let count = u32::try_from(stored.headers.len()).map_err(|_| too_big("header list"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in &stored.headers {
        let n = u16::try_from(name.as_str().len()).map_err(|_| too_big("header name"))?;
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        let v = u32::try_from(value.len()).map_err(|_| too_big("header value"))?;
        out.extend_from_slice(&v.to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&stored.body);
    Ok(out)
}

/// Reads a stored response; anything malformed is an error.
pub(super) fn decode_stored(bytes: &[u8]) -> Result<Stored, StoreError> {
    let bad = |why: &str| StoreError::new(format!("malformed stored response: {why}"));
    let mut r = Reader(bytes);
    if r.u8().ok_or_else(|| bad("empty"))? != STORED_V1 {
        return Err(bad("unknown version"));
    }
    let status = r.u16().ok_or_else(|| bad("truncated status"))?;
    let status = StatusCode::from_u16(status).map_err(|_| bad("invalid status"))?;
    let count = r.u32().ok_or_else(|| bad("truncated header count"))?;
    let count = usize::try_from(count).map_err(|_| bad("header count"))?;
    // Each header takes at least 6 bytes: a count beyond that is a lie, not a reason to
    // allocate.
    if count > r.0.len() / 6 {
        return Err(bad("header count exceeds the data"));
    }
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let n = r.u16().ok_or_else(|| bad("truncated header"))?;
        let name = r
            .take(usize::from(n))
            .ok_or_else(|| bad("truncated header"))?;
        let name = HeaderName::from_bytes(name).map_err(|_| bad("invalid header name"))?;
        let v = r.u32().ok_or_else(|| bad("truncated header"))?;
        let v = usize::try_from(v).map_err(|_| bad("header value length"))?;
        let value = r.take(v).ok_or_else(|| bad("truncated header"))?;
        let value = HeaderValue::from_bytes(value).map_err(|_| bad("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Stored {
        status,
        headers,
        body: Bytes::copy_from_slice(r.0),
    })
}

/// A bounds-checked cursor over bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert(
            "x-bin",
            HeaderValue::from_bytes(b"\xff\x80 opaque").unwrap(),
        );
        Stored {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"order\":1}\0\xff"),
        }
    }

    #[test]
    fn stored_round_trips() {
        let s = sample();
        assert_eq!(decode_stored(&encode_stored(&s).unwrap()).unwrap(), s);
        let empty = Stored {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        assert_eq!(
            decode_stored(&encode_stored(&empty).unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn malformed_stored_values_are_errors_not_panics() {
        let good = encode_stored(&sample()).unwrap();
        // Every truncation inside the header section, and a few corruptions.
        let body_len = sample().body.len();
        for n in 0..good.len() - body_len {
            assert!(decode_stored(&good[..n]).is_err(), "truncated at {n}");
        }
        let mut bad_version = good.clone();
        bad_version[0] = 9;
        assert!(decode_stored(&bad_version).is_err());
        let mut bad_status = good.clone();
        bad_status[1..3].copy_from_slice(&1000u16.to_be_bytes());
        assert!(decode_stored(&bad_status).is_err());
        let mut huge_count = good.clone();
        huge_count[3..7].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_stored(&huge_count).is_err());
        let mut bad_name = good;
        bad_name[9] = b' ';
        assert!(decode_stored(&bad_name).is_err());
        // Arbitrary bytes never panic.
        let mut x: u32 = 12345;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 24) as u8
                })
                .collect();
            let _ = decode_stored(&junk);
        }
    }
}
