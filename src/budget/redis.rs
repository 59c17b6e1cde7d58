//! The Redis store (feature `redis`): task and user budgets, and idempotency keys, shared by
//! every process that talks to one Redis.
//!
//! # One round trip per decision
//!
//! Every method is **one** Lua script call (`EVALSHA`; [`redis::Script`] loads the script
//! and calls again when Redis answers `NOSCRIPT`, e.g. after a restart). A script runs
//! atomically in Redis, so a budget decision over several draws is all or nothing without
//! locks or refunds: the script checks every draw first and writes only if all pass.
//!
//! # Clock
//!
//! Time is Redis's own (`TIME`, in microseconds), never the replicas' clocks, which disagree.
//! Expiry is Redis's (`PX`): a key holds nothing worth keeping once it is gone.
//!
//! # Keys and values
//!
//! Every key starts with the store's prefix (default `trg:`):
//!
//! | key | value | expires |
//! |---|---|---|
//! | `<prefix>b:c:<scope>:<id>` ([`Limit::Count`]; an id longer than 64 bytes or outside `[A-Za-z0-9._:@/+=-]` as `#` + its XXH3-128 in hex) | the count, decimal | `ttl` after the last granted draw |
//! | `<prefix>b:r:<scope>:<id>` ([`Limit::Rate`]) | GCRA's theoretical arrival time, µs of Redis time | when the bucket is full again |
//! | `<prefix>i:<scoped key>` (idempotency) | a hash: `s` state (`F` in flight, `D` done), `f` fingerprint and `t` claim token (16 bytes each, big endian), `l` lease end (ms, Redis clock) while in flight, `r` the response once done | the claim's record (the TTL, so an abandoned claim answers "outcome unknown" and is never simply claimed again); then the result's TTL |
//! | `<prefix>ip:<principal>` (`g`, or `p:<length>:<principal>`) | a sorted set of the principal's idempotency keys, scored by their expiry (ms): its share ([`RedisStore::max_keys_per_principal`]) | with its longest-lived key |
//!
//! A finished response is encoded as: a version byte (`1`), the status (`u16`), the header
//! count (`u32`), each header as name length (`u16`), name, value length (`u32`), value;
//! then the body (the rest). Integers are big endian. A stored value that does not decode is
//! a [`StoreError`], never a panic.
//!
//! The scripts touch several keys of one call; on Redis Cluster, put the keys of one call in
//! one slot with a hash-tagged prefix, e.g. `{trg}:` (then every key lives in that slot).
//!
//! # Failures
//!
//! Every call is bounded by the store's [timeout](RedisStore::timeout) (default 250 ms); an
//! error, a timeout or a malformed answer is a [`StoreError`]. The [`ConnectionManager`]
//! reconnects in the background, so the store recovers by itself once Redis is back. What a
//! [`StoreError`] means for a retry is [`Budgets::on_store_error`](super::Budgets::on_store_error)
//! (fail closed by default); the [`IdempotencyLayer`](crate::server::IdempotencyLayer) answers
//! 503.
//!
//! A call that timed out may still run in Redis when its bytes arrive (Redis was slow, not
//! gone): a budget draw is then spent though the retry did not happen, which errs on the side
//! of fewer retries, never more. An idempotency `begin` that timed out is released again by
//! its claim token (the release queues behind it on the same connection), so it never locks
//! a key that nobody holds; `renew`, `complete` and `release` act only under their own token.
//!
//! Configure Redis with `maxmemory-policy noeviction` (or no `maxmemory`): an evicted
//! idempotency key would let a retry run its request again.
//!
//! Requires Redis 5 or later (scripts that call `TIME` and then write).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script, Value};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{BudgetStore, Draw, Grant, Limit, StoreError};
use crate::server::{Begin, Claim, ClaimToken, IdempotencyStore, Ownership, ScopedKey, Stored};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "trg:";
/// The default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// The longest GCRA emission interval, in µs (about 31 years: "never refills").
const MAX_INTERVAL_US: u64 = 1_000_000_000_000_000;
/// The largest GCRA tolerance, in µs (about 127 years). With Redis's clock (~1.8e15 µs) and
/// one interval, every GCRA time stays below 2^53: exact in Lua's doubles.
const MAX_TOLERANCE_US: u64 = 4_000_000_000_000_000;
/// The longest expiry, in ms (about 317 years; Redis rejects expiries that overflow).
const MAX_EXPIRY_MS: u64 = 10_000_000_000_000;

/// Budget draws: `KEYS[i]` is draw `i`'s key; `ARGV[4i-3..4i]` its kind (`c` count, `r`
/// rate) and three numbers: count `max`, `ttl` (ms), whether a wait is known (`1`/`0`); or
/// rate interval (µs), tolerance (µs), whether a wait is known.
///
/// Answers `{1}` (granted) or `{0, i, wait_us}` (draw `i` refused; `wait_us` -1 if unknown).
const DRAW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = (i - 1) * 4
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local b = tonumber(ARGV[base + 3])
  local known = ARGV[base + 4] == '1'
  local cur = state[k]
  if cur == nil then
    local raw = redis.call('GET', k)
    if raw then
      cur = tonumber(raw)
      if cur == nil then
        return redis.error_reply('malformed budget value at ' .. k)
      end
    else
      cur = 0
    end
  end
  if kind == 'c' then
    if cur >= a then
      local wait = -1
      if known then
        local pttl = redis.call('PTTL', k)
        if pttl >= 0 then wait = pttl * 1000 end
      end
      return {0, i, wait}
    end
    state[k] = cur + 1
  else
    local nxt = math.max(cur, now) + a
    local ahead = nxt - now
    if ahead > b then
      local wait = -1
      if known then wait = ahead - b end
      return {0, i, wait}
    end
    state[k] = nxt
  end
end
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = (i - 1) * 4
  local v = state[k]
  local px
  if ARGV[base + 1] == 'c' then
    px = tonumber(ARGV[base + 3])
  else
    px = math.ceil((v - now) / 1000)
  end
  if px < 1 then px = 1 end
  redis.call('SET', k, string.format('%.0f', v), 'PX', string.format('%.0f', px))
end
return {1}
"#;

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
/// Answers `{0}` claimed, `{1}` in flight, `{2, response}` done, `{3}` mismatch, `{4}`
/// malformed entry, `{5}` abandoned, `{6}` the principal holds its share.
const BEGIN_LUA: &str = r#"
local v = redis.call('HMGET', KEYS[1], 's', 'f', 'l')
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

static DRAW: LazyLock<Script> = LazyLock::new(|| Script::new(DRAW_LUA));
static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW_LUA}{BEGIN_LUA}")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{NOW_LUA}{COMPLETE_LUA}")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW_LUA}{RENEW_LUA}")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

/// Budgets and idempotency keys in Redis, shared by every process that uses the same Redis
/// and prefix. Implements [`BudgetStore`] and [`IdempotencyStore`].
///
/// Each call is one atomic Lua script (one round trip), timed by Redis's clock, bounded by a
/// timeout; see the `budget::redis` module source for the keys, values and scripts.
///
/// Clones share the connection (a multiplexed [`ConnectionManager`] that reconnects).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_retry_guard::budget::RedisStore;
/// use tower_retry_guard::{Budgets, RetryLayer};
/// use tower_retry_guard::server::IdempotencyLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_retry_guard::budget::StoreError> {
/// let store = RedisStore::new("redis://127.0.0.1:6379/")?
///     .prefix("myapp:")
///     .timeout(Duration::from_millis(100));
/// // Client side: task and user budgets shared by every replica.
/// let retry = RetryLayer::new().budgets(Budgets::default().store(store.clone()));
/// // Provider side: one execution per idempotency key across every replica.
/// let dedupe = IdempotencyLayer::new(store);
/// # let _ = (retry, dedupe);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    manager: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    max_keys_per_principal: u64,
}

/// The default share of idempotency keys one principal may hold in Redis.
const DEFAULT_MAX_KEYS_PER_PRINCIPAL: u64 = 25_000;

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_keys_per_principal", &self.max_keys_per_principal)
            .finish_non_exhaustive()
    }
}

fn store_error(what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::new(format!("redis {what}: {e}"))
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port/db`), with the default prefix
    /// (`trg:`) and timeout (250 ms).
    ///
    /// Connects lazily, in the background: this never waits for Redis, and a Redis that is
    /// down at start-up is a [`StoreError`] per call until it is up. Reconnection attempts
    /// back off from 50 ms up to 1 s; each gives up after 1 s. Must be called within a Tokio
    /// runtime (an error otherwise). For other settings, build a [`ConnectionManager`] and use
    /// [`RedisStore::from_manager`].
    pub fn new(url: &str) -> Result<Self, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::new(
                "RedisStore::new must be called within a Tokio runtime",
            ));
        }
        let client = Client::open(url).map_err(|e| store_error("url", e))?;
        let config = ConnectionManagerConfig::new()
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(6)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None);
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| store_error("connection", e))?;
        Ok(RedisStore::from_manager(manager))
    }

    /// A store on an existing connection manager, with the default prefix and timeout.
    pub fn from_manager(manager: ConnectionManager) -> Self {
        RedisStore {
            manager,
            prefix: Arc::from(DEFAULT_PREFIX),
            timeout: DEFAULT_TIMEOUT,
            max_keys_per_principal: DEFAULT_MAX_KEYS_PER_PRINCIPAL,
        }
    }

    /// The most idempotency keys (claims and results) one principal may hold (default
    /// 25 000; the global scope counts as one principal; `0`: no limit). A new key beyond it
    /// is refused with [`StoreError::full`] naming the principal, so one tenant cannot fill
    /// Redis for the others. Responses are at most the layer's `max_response_body` each, so
    /// this also bounds a principal's bytes; size Redis's `maxmemory` for it.
    pub fn max_keys_per_principal(mut self, max: u64) -> Self {
        self.max_keys_per_principal = max;
        self
    }

    /// The prefix of every key this store writes (default `trg:`). Stores that should share
    /// budgets and keys must use the same prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// How long one call may take, connecting included (default 250 ms). Past it, the call
    /// is a [`StoreError`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The per-call timeout.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// Checks that Redis answers (`PING`) within the timeout: for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.manager.clone();
        let answer: String = self
            .bounded("ping", async move {
                ::redis::cmd("PING").query_async(&mut conn).await
            })
            .await?;
        if answer == "PONG" {
            Ok(())
        } else {
            Err(store_error("ping", format!("unexpected answer {answer:?}")))
        }
    }

    /// Runs `call` within the timeout, turning every failure into a [`StoreError`].
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_error(what, e)),
            Err(_) => Err(store_error(
                what,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }

    fn budget_key(&self, draw: &Draw) -> String {
        let kind = match draw.limit {
            Limit::Count { .. } => "c",
            Limit::Rate { .. } => "r",
        };
        // Any id, bounded: a long or unusual one under its digest (as `Budgets` sends it).
        format!(
            "{}b:{kind}:{}:{}",
            self.prefix,
            draw.scope.as_str(),
            super::budget_key(&draw.key)
        )
    }

    fn idempotency_key(&self, key: &ScopedKey) -> String {
        format!("{}i:{}", self.prefix, key.storage_key())
    }

    /// The sorted set of the keys `key`'s principal holds.
    fn principal_keys(&self, key: &ScopedKey) -> String {
        match key.principal() {
            None => format!("{}ip:g", self.prefix),
            Some(p) => format!("{}ip:p:{}:{p}", self.prefix, p.len()),
        }
    }

    /// Runs one idempotency script that answers an integer.
    async fn int_script(
        &self,
        what: &str,
        script: &Script,
        key: &ScopedKey,
        args: &[&[u8]],
    ) -> Result<i64, StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.idempotency_key(key))
            .key(self.principal_keys(key));
        for a in args {
            invocation.arg(*a);
        }
        let mut conn = self.manager.clone();
        let value: Value = self
            .bounded(what, invocation.invoke_async(&mut conn))
            .await?;
        match value {
            Value::Int(n) => Ok(n),
            other => Err(store_error(what, format!("unexpected answer {other:?}"))),
        }
    }
}

/// Whole milliseconds, rounded up, at least 1 and at most [`MAX_EXPIRY_MS`].
fn millis(d: Duration) -> u64 {
    let ms = d.as_micros().div_ceil(1000);
    u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The script arguments of one draw: kind and three numbers.
fn draw_args(limit: Limit) -> [String; 4] {
    match limit {
        Limit::Count { max, ttl } => [
            "c".to_owned(),
            max.to_string(),
            millis(ttl).to_string(),
            u8::from(max > 0).to_string(),
        ],
        Limit::Rate { tokens, per, burst } => {
            let interval = if tokens == 0 {
                MAX_INTERVAL_US
            } else {
                (micros(per) / u64::from(tokens)).clamp(1, MAX_INTERVAL_US)
            };
            let tolerance = interval
                .saturating_mul(u64::from(burst))
                .min(MAX_TOLERANCE_US);
            [
                "r".to_owned(),
                interval.to_string(),
                tolerance.to_string(),
                u8::from(burst > 0 && tokens > 0).to_string(),
            ]
        }
    }
}

impl BudgetStore for RedisStore {
    async fn draw(&self, draws: &[Draw]) -> Result<Grant, StoreError> {
        if draws.is_empty() {
            return Ok(Grant::Granted);
        }
        let mut invocation = DRAW.prepare_invoke();
        for d in draws {
            invocation.key(self.budget_key(d));
            for a in draw_args(d.limit) {
                invocation.arg(a);
            }
        }
        let mut conn = self.manager.clone();
        let value: Value = self
            .bounded("budget draw", invocation.invoke_async(&mut conn))
            .await?;
        parse_grant(&value, draws)
    }
}

/// Reads the draw script's answer.
fn parse_grant(value: &Value, draws: &[Draw]) -> Result<Grant, StoreError> {
    let bad = || store_error("budget draw", format!("unexpected answer {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    match items.as_slice() {
        [Value::Int(1)] => Ok(Grant::Granted),
        [Value::Int(0), Value::Int(i), Value::Int(wait_us)] => {
            let draw = usize::try_from(*i)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| draws.get(i))
                .ok_or_else(bad)?;
            let retry_in = u64::try_from(*wait_us).ok().map(Duration::from_micros);
            Ok(Grant::Denied {
                scope: draw.scope,
                retry_in,
            })
        }
        _ => Err(bad()),
    }
}

impl IdempotencyStore for RedisStore {
    async fn begin(&self, key: &ScopedKey, claim: &Claim) -> Result<Begin, StoreError> {
        let mut invocation = BEGIN.prepare_invoke();
        invocation
            .key(self.idempotency_key(key))
            .key(self.principal_keys(key))
            .arg(&claim.fingerprint.as_u128().to_be_bytes()[..])
            .arg(&claim.token.as_u128().to_be_bytes()[..])
            .arg(millis(claim.lease))
            .arg(millis(claim.keep.max(claim.lease)))
            .arg(if claim.take_over { "1" } else { "0" })
            .arg(self.max_keys_per_principal);
        let mut conn = self.manager.clone();
        let value: Value = self
            .bounded("idempotency begin", invocation.invoke_async(&mut conn))
            .await?;
        let bad = |why: &str| store_error("idempotency begin", format!("{why}: {value:?}"));
        let Value::Array(items) = &value else {
            return Err(bad("unexpected answer"));
        };
        match items.as_slice() {
            [Value::Int(0)] => Ok(Begin::Claimed),
            [Value::Int(1)] => Ok(Begin::InFlight),
            [Value::Int(2), Value::BulkString(bytes)] => decode_stored(bytes).map(Begin::Done),
            [Value::Int(3)] => Ok(Begin::Mismatch),
            [Value::Int(4)] => Err(bad("malformed entry in Redis")),
            [Value::Int(5)] => Ok(Begin::Abandoned),
            [Value::Int(6)] => Err(StoreError::full(match key.principal() {
                Some(p) => format!(
                    "principal {:?} holds {} idempotency keys in Redis, its share",
                    p.chars().take(64).collect::<String>(),
                    self.max_keys_per_principal
                ),
                None => format!(
                    "the global scope (requests without a principal) holds {} idempotency keys in Redis, its share",
                    self.max_keys_per_principal
                ),
            })),
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
            1 | 2 => Ok(Ownership::Held),
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

/// The encoding's version byte.
const STORED_V1: u8 = 1;

/// Encodes a response (see the module docs for the layout).
fn encode_stored(stored: &Stored) -> Result<Vec<u8>, StoreError> {
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
fn decode_stored(bytes: &[u8]) -> Result<Stored, StoreError> {
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
    use crate::budget::Scope;

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

    #[test]
    fn draw_answers_are_checked() {
        let draws = [Draw {
            scope: Scope::User,
            key: "u".into(),
            limit: Limit::Count {
                max: 1,
                ttl: Duration::from_secs(1),
            },
        }];
        let ok = Value::Array(vec![Value::Int(1)]);
        assert_eq!(parse_grant(&ok, &draws), Ok(Grant::Granted));
        let denied = Value::Array(vec![Value::Int(0), Value::Int(1), Value::Int(1500)]);
        assert_eq!(
            parse_grant(&denied, &draws),
            Ok(Grant::Denied {
                scope: Scope::User,
                retry_in: Some(Duration::from_micros(1500))
            })
        );
        let unknown = Value::Array(vec![Value::Int(0), Value::Int(1), Value::Int(-1)]);
        assert!(matches!(
            parse_grant(&unknown, &draws),
            Ok(Grant::Denied { retry_in: None, .. })
        ));
        for v in [
            Value::Array(vec![Value::Int(0), Value::Int(2), Value::Int(1)]),
            Value::Array(vec![Value::Int(0), Value::Int(0), Value::Int(1)]),
            Value::Array(vec![]),
            Value::Int(1),
            Value::Nil,
        ] {
            assert!(parse_grant(&v, &draws).is_err(), "{v:?}");
        }
    }

    #[test]
    fn limits_become_bounded_arguments() {
        let args = draw_args(Limit::Rate {
            tokens: 0,
            per: Duration::MAX,
            burst: u32::MAX,
        });
        assert_eq!(args[1], MAX_INTERVAL_US.to_string());
        assert_eq!(args[2], MAX_TOLERANCE_US.to_string());
        assert_eq!(args[3], "0");
        let args = draw_args(Limit::Count {
            max: 5,
            ttl: Duration::ZERO,
        });
        assert_eq!(args, ["c", "5", "1", "1"]);
        assert_eq!(millis(Duration::MAX), MAX_EXPIRY_MS);
        assert_eq!(millis(Duration::from_micros(1001)), 2);
    }
}
