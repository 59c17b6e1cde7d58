//! The idempotency half of [`RedisStore`]: claim, renew, complete and release, each one
//! script call, each fenced by the claim's token.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{Script, Value};

use super::codec::{decode_stored, encode_stored};
use super::keys::SHARE_BUCKETS;
use super::{RedisStore, millis, store_error};
use crate::server::{Begin, Claim, ClaimToken, IdempotencyStore, Ownership, ScopedKey, Stored};
use crate::store::StoreError;

/// Redis's clock in milliseconds, for the idempotency scripts.
const NOW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Claims the hash `KEYS[1]` (fields `s` state `F`/`D`, `f` fingerprint, `t` token, `l` lease
/// end in ms, `r` response) for fingerprint `ARGV[1]` and token `ARGV[2]`, leased `ARGV[3]`
/// ms, the record kept `ARGV[4]` ms; `ARGV[5]` = `1` takes over an abandoned claim.
///
/// A new key is counted in the principal's sorted set `KEYS[2]` (member: the key, score: its
/// expiry) unless it holds `ARGV[6]` live keys already (`0`: no limit).
///
/// A key already in flight under the same token is the caller's own claim (the script ran
/// twice: a cluster client sends a command again after a dropped connection): `{0}` again.
///
/// Answers `{0}` claimed, `{1}` in flight, `{2, response}` done, `{3}` mismatch, `{4}`
/// malformed entry, `{5}` abandoned, `{6}` the principal holds its share.
const BEGIN_LUA: &str = r#"
local v = redis.call('HMGET', KEYS[1], 's', 'f', 'l', 't')
if not v[1] then
  local share = tonumber(ARGV[6])
  if share > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    if redis.call('ZCARD', KEYS[2]) >= share then return {6} end
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), KEYS[1])
    if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', 'F', 'f', ARGV[1], 't', ARGV[2], 'l', now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {0}
end
if v[2] ~= ARGV[1] then return {3} end
if v[1] == 'D' then return {2, redis.call('HGET', KEYS[1], 'r')} end
if v[1] == 'F' and v[4] == ARGV[2] then return {0} end
local lease = tonumber(v[3])
if v[1] ~= 'F' or not lease then return {4} end
if lease > now then return {1} end
if ARGV[5] ~= '1' then return {5} end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'l', now + tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {0}
"#;

/// Completes `KEYS[1]` claimed under token `ARGV[1]` with the response `ARGV[2]`, kept
/// `ARGV[3]` ms (even if its lease ran out: nobody took it over); writes it if the key is
/// gone (`ARGV[4]`: the fingerprint), counting it in the principal's set `KEYS[2]`.
///
/// Answers 1 stored, 2 already done under this token, 0 held by another claim, -1 malformed
/// entry.
const COMPLETE_LUA: &str = r#"
local v = redis.call('HMGET', KEYS[1], 's', 't')
if v[1] and v[2] ~= ARGV[1] then return 0 end
if v[1] == 'D' then return 2 end
if v[1] and v[1] ~= 'F' then return -1 end
if not v[1] then redis.call('HSET', KEYS[1], 'f', ARGV[4], 't', ARGV[1]) end
redis.call('HSET', KEYS[1], 's', 'D', 'r', ARGV[2])
redis.call('HDEL', KEYS[1], 'l')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), KEYS[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
"#;

/// Extends the lease of `KEYS[1]` claimed under token `ARGV[1]` to `ARGV[2]` ms from now;
/// re-creates the claim (fingerprint `ARGV[3]`, kept `ARGV[4]` ms) if the key is gone.
/// Answers 1 if renewed, else 0.
const RENEW_LUA: &str = r#"
local v = redis.call('HMGET', KEYS[1], 's', 't')
if not v[1] then
  redis.call('HSET', KEYS[1], 's', 'F', 'f', ARGV[3], 't', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), KEYS[1])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
elseif v[1] ~= 'F' or v[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'l', now + tonumber(ARGV[2]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#;

/// Deletes `KEYS[1]` if it is in flight under token `ARGV[1]`. Answers 1 if deleted, else 0.
const RELEASE_LUA: &str = r#"
local v = redis.call('HMGET', KEYS[1], 's', 't')
if v[1] ~= 'F' or v[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"#;

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW_LUA}{BEGIN_LUA}")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{NOW_LUA}{COMPLETE_LUA}")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW_LUA}{RENEW_LUA}")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

impl RedisStore {
    /// The refusal of a new key beyond its principal's share (`cap` keys in its set).
    fn share_full(&self, key: &ScopedKey, cap: u64) -> StoreError {
        let who = match key.principal() {
            Some(p) => format!("principal {:?}", p.chars().take(64).collect::<String>()),
            None => "the global scope (requests without a principal)".to_owned(),
        };
        StoreError::full(if self.is_cluster() {
            format!(
                "{who} holds {cap} idempotency keys in one of its {SHARE_BUCKETS} Redis Cluster buckets, its share of {}",
                self.max_keys_per_principal
            )
        } else {
            format!("{who} holds {cap} idempotency keys in Redis, its share")
        })
    }
}

impl IdempotencyStore for RedisStore {
    async fn begin(&self, key: &ScopedKey, claim: &Claim) -> Result<Begin, StoreError> {
        let keys = self.idempotency_keys(key);
        let cap = keys.cap;
        let mut invocation = BEGIN.prepare_invoke();
        invocation
            .key(keys.key)
            .key(keys.share)
            .arg(&claim.fingerprint.as_u128().to_be_bytes()[..])
            .arg(&claim.token.as_u128().to_be_bytes()[..])
            .arg(millis(claim.lease))
            .arg(millis(claim.keep.max(claim.lease)))
            .arg(if claim.take_over { "1" } else { "0" })
            .arg(cap);
        let value = self
            .bounded("idempotency begin", self.conn.invoke(&invocation))
            .await?;
        let bad = |why: &str| store_error("idempotency begin", format!("{why}: {value:?}"));
        let Value::Array(items) = &value else {
            return Err(bad("unexpected answer"));
        };
        match items.as_slice() {
            [Value::Int(0)] => {
                // A claim counts once the replicas asked for hold it.
                self.replicated("idempotency begin", key).await?;
                Ok(Begin::Claimed)
            }
            [Value::Int(1)] => Ok(Begin::InFlight),
            [Value::Int(2), Value::BulkString(bytes)] => decode_stored(bytes).map(Begin::Done),
            [Value::Int(3)] => Ok(Begin::Mismatch),
            [Value::Int(4)] => Err(bad("malformed entry in Redis")),
            [Value::Int(5)] => Ok(Begin::Abandoned),
            [Value::Int(6)] => Err(self.share_full(key, cap)),
            _ => Err(bad("unexpected answer")),
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        claim: &Claim,
        stored: Stored,
        ttl: Duration,
    ) -> Result<Ownership, StoreError> {
        let encoded = encode_stored(&stored)?;
        let ttl = millis(ttl).to_string();
        let token = claim.token.as_u128().to_be_bytes();
        let fingerprint = claim.fingerprint.as_u128().to_be_bytes();
        match self
            .int_script(
                "idempotency complete",
                &COMPLETE,
                key,
                &[&token, &encoded, ttl.as_bytes(), &fingerprint],
            )
            .await?
        {
            1 | 2 => {
                self.replicated("idempotency complete", key).await?;
                Ok(Ownership::Held)
            }
            0 => Ok(Ownership::Lost),
            n => Err(store_error(
                "idempotency complete",
                format!("malformed entry in Redis ({n})"),
            )),
        }
    }

    async fn renew(&self, key: &ScopedKey, claim: &Claim) -> Result<Ownership, StoreError> {
        let lease = millis(claim.lease).to_string();
        let keep = millis(claim.keep.max(claim.lease)).to_string();
        let token = claim.token.as_u128().to_be_bytes();
        let fingerprint = claim.fingerprint.as_u128().to_be_bytes();
        let n = self
            .int_script(
                "idempotency renew",
                &RENEW,
                key,
                &[&token, lease.as_bytes(), &fingerprint, keep.as_bytes()],
            )
            .await?;
        Ok(if n == 1 {
            Ownership::Held
        } else {
            Ownership::Lost
        })
    }

    async fn release(&self, key: &ScopedKey, token: ClaimToken) -> Result<Ownership, StoreError> {
        let token = token.as_u128().to_be_bytes();
        let n = self
            .int_script("idempotency release", &RELEASE, key, &[&token])
            .await?;
        Ok(if n == 1 {
            Ownership::Held
        } else {
            Ownership::Lost
        })
    }
}
