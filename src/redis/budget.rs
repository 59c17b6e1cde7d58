//! The budget half of [`RedisStore`]: one script call per decision, all draws or none.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{Script, Value};

use super::{RedisStore, micros, millis, store_error};
use crate::budget::{BudgetStore, Draw, Grant, Limit, bucket, left_in_bucket};
use crate::store::StoreError;

/// The longest GCRA emission interval, in µs (about 31 years: "never refills").
const MAX_INTERVAL_US: u64 = 1_000_000_000_000_000;
/// The largest GCRA tolerance, in µs (about 127 years). With Redis's clock (~1.8e15 µs) and
/// one interval, every GCRA time stays below 2^53: exact in Lua's doubles.
const MAX_TOLERANCE_US: u64 = 4_000_000_000_000_000;

/// The largest count or cost (2^53 - 1): exact in Lua's doubles.
const MAX_UNITS: u64 = (1 << 53) - 1;

/// Budget draws: `KEYS[i]` is draw `i`'s key; `ARGV[5i-4..5i]` its kind (`c` a sum, of
/// retries or of cost units; `r` a GCRA rate, of retries or of cost units) and four
/// numbers: sum `max`, `ttl` (ms), whether a wait is known (`1`/`0`), the amount drawn; or
/// rate interval of this draw (µs, its amount included), tolerance (µs), whether a wait is
/// known, unused.
///
/// Answers `{1}` (granted) or `{0, i, wait_us, used}` (draw `i` refused; `wait_us` -1 if
/// unknown; `used` the sum taken, or how far ahead (µs) the rate's arrival time was).
const DRAW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = (i - 1) * 5
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local b = tonumber(ARGV[base + 3])
  local known = ARGV[base + 4] == '1'
  local n = tonumber(ARGV[base + 5])
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
    if cur + n > a then
      local wait = -1
      if known then
        local pttl = redis.call('PTTL', k)
        if pttl >= 0 then wait = pttl * 1000 end
      end
      return {0, i, wait, cur}
    end
    state[k] = cur + n
  else
    local start = math.max(cur, now)
    local nxt = start + a
    local ahead = nxt - now
    if ahead > b then
      local wait = -1
      if known then wait = ahead - b end
      return {0, i, wait, start - now}
    end
    state[k] = nxt
  end
end
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = (i - 1) * 5
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

static DRAW: LazyLock<Script> = LazyLock::new(|| Script::new(DRAW_LUA));

/// The script arguments of one draw: kind and four numbers.
fn draw_args(draw: &Draw) -> [String; 5] {
    let amount = draw.amount.min(MAX_UNITS);
    let sum = |max: u64, n: u64, ttl: Duration| {
        [
            "c".to_owned(),
            max.min(MAX_UNITS).to_string(),
            millis(ttl).to_string(),
            u8::from(max > 0 && n <= max).to_string(),
            n.to_string(),
        ]
    };
    let rate = |(interval, tolerance): (u64, u64), known: bool| {
        [
            "r".to_owned(),
            interval.max(1).to_string(),
            tolerance.min(MAX_TOLERANCE_US).to_string(),
            u8::from(known).to_string(),
            "0".to_owned(),
        ]
    };
    match draw.limit {
        Limit::Count { max, ttl } => sum(u64::from(max), 1, ttl),
        Limit::Cost { max, ttl } => sum(max, amount, ttl),
        Limit::Rate { tokens, per, burst } => {
            let interval = if tokens == 0 {
                MAX_INTERVAL_US
            } else {
                (micros(per) / u64::from(tokens)).clamp(1, MAX_INTERVAL_US)
            };
            let tolerance = interval.saturating_mul(u64::from(burst));
            rate((interval, tolerance), burst > 0 && tokens > 0)
        }
        Limit::CostRate { units, per, burst } => rate(
            bucket(units, micros(per), burst, amount, MAX_INTERVAL_US),
            units > 0 && amount <= burst,
        ),
    }
}

/// What a refused draw had left, from the script's `used`.
fn left_of(draw: &Draw, used: i64) -> Option<u64> {
    let used = u64::try_from(used).ok()?;
    Some(match draw.limit {
        Limit::Count { max, .. } => u64::from(max).saturating_sub(used),
        Limit::Cost { max, .. } => max.min(MAX_UNITS).saturating_sub(used),
        Limit::Rate { .. } => 0,
        Limit::CostRate { units, per, burst } => {
            let per = micros(per);
            let (_, tolerance) = bucket(units, per, burst, draw.amount, MAX_INTERVAL_US);
            left_in_bucket(units, per, tolerance.min(MAX_TOLERANCE_US), used)
        }
    })
}

/// Gives back one granted draw per key, in the layout of [`DRAW_LUA`] (a cluster decision
/// whose draws span slots takes each slot's draws in its own script call; when one refuses,
/// the others are given back). A sum loses the amount (its expiry kept); a rate's arrival
/// time moves back the draw's interval (the key deleted once the bucket is full again).
const REFUND_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = (i - 1) * 5
  local cur = tonumber(redis.call('GET', k))
  if cur then
    if ARGV[base + 1] == 'c' then
      local n = math.min(cur, tonumber(ARGV[base + 5]))
      if n > 0 then redis.call('DECRBY', k, string.format('%.0f', n)) end
    else
      local back = cur - tonumber(ARGV[base + 2])
      if back <= now then
        redis.call('DEL', k)
      else
        local px = math.ceil((back - now) / 1000)
        redis.call('SET', k, string.format('%.0f', back), 'PX', string.format('%.0f', px))
      end
    end
  end
end
return 1
"#;

static REFUND: LazyLock<Script> = LazyLock::new(|| Script::new(REFUND_LUA));

/// Charges each draw on top, past its limit (a settlement: the cost was spent), in the
/// layout of [`DRAW_LUA`]: a sum grows by the amount (its expiry renewed); a rate's arrival
/// time moves on by the draw's interval.
const CHARGE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = (i - 1) * 5
  local cur = 0
  local raw = redis.call('GET', k)
  if raw then
    cur = tonumber(raw)
    if cur == nil then
      return redis.error_reply('malformed budget value at ' .. k)
    end
  end
  local v
  local px
  if ARGV[base + 1] == 'c' then
    v = cur + tonumber(ARGV[base + 5])
    px = tonumber(ARGV[base + 3])
  else
    v = math.max(cur, now) + tonumber(ARGV[base + 2])
    px = math.ceil((v - now) / 1000)
  end
  if px < 1 then px = 1 end
  redis.call('SET', k, string.format('%.0f', v), 'PX', string.format('%.0f', px))
end
return 1
"#;

static CHARGE: LazyLock<Script> = LazyLock::new(|| Script::new(CHARGE_LUA));

/// The draws of one decision that share a slot: their indices in the decision, their keys.
struct Group {
    draws: Vec<usize>,
    keys: Vec<String>,
}

impl RedisStore {
    /// One script call over `keys` (draws `indices` of `draws`), bounded by the timeout.
    async fn run(
        &self,
        what: &str,
        script: &Script,
        draws: &[Draw],
        group: &Group,
    ) -> Result<Value, StoreError> {
        let mut invocation = script.prepare_invoke();
        for (&i, key) in group.draws.iter().zip(&group.keys) {
            invocation.key(key);
            let draw = draws
                .get(i)
                .ok_or_else(|| store_error(what, "draw index out of range (a bug in the store)"))?;
            for a in draw_args(draw) {
                invocation.arg(a);
            }
        }
        self.bounded(what, self.conn.invoke(&invocation)).await
    }

    /// A decision whose draws span several slots (cluster layout): each slot's draws in one
    /// script call, all at once; if one refuses or fails, the granted ones are given back
    /// before answering, so the decision stays all or nothing.
    async fn draw_split(&self, draws: &[Draw], groups: Vec<Group>) -> Result<Grant, StoreError> {
        let answers = join_all(
            groups
                .iter()
                .map(|g| Box::pin(self.run("budget draw", &DRAW, draws, g)) as _)
                .collect(),
        )
        .await;
        let mut denied: Option<(usize, Grant)> = None;
        let mut failed = None;
        let mut granted = Vec::new();
        for (group, answer) in groups.iter().zip(answers) {
            let subset: Vec<Draw> = group
                .draws
                .iter()
                .filter_map(|&i| draws.get(i).cloned())
                .collect();
            match answer.and_then(|v| parse_grant(&v, &subset).map(|g| (v, g))) {
                Ok((_, Grant::Granted)) => granted.push(group),
                Ok((v, grant @ Grant::Denied { .. })) => {
                    let at = refused_index(&v)
                        .and_then(|i| group.draws.get(i))
                        .copied()
                        .unwrap_or(usize::MAX);
                    if denied.as_ref().is_none_or(|(first, _)| at < *first) {
                        denied = Some((at, grant));
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        if denied.is_none() && failed.is_none() {
            return Ok(Grant::Granted);
        }
        // Give back what was taken. A refund that fails leaves a draw spent for a retry that
        // did not happen: fewer retries, never more.
        let refunds = join_all(
            granted
                .into_iter()
                .map(|g| Box::pin(self.run("budget refund", &REFUND, draws, g)) as _)
                .collect(),
        )
        .await;
        for r in refunds {
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not give back a budget draw; it stays spent");
            }
        }
        match (denied, failed) {
            (Some((_, grant)), _) => Ok(grant),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(Grant::Granted),
        }
    }
}

type Pending<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Value, StoreError>> + Send + 'a>>;

/// Runs every future at once; their answers in order.
async fn join_all(mut futures: Vec<Pending<'_>>) -> Vec<Result<Value, StoreError>> {
    let mut answers: Vec<Option<Result<Value, StoreError>>> =
        futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(answers.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(store_error("budget draw", "no answer"))))
        .collect()
}

/// The 0-based index, within its call, of the draw a `{0, i, wait}` answer names.
fn refused_index(value: &Value) -> Option<usize> {
    match value {
        Value::Array(items) => match items.as_slice() {
            [Value::Int(0), Value::Int(i), _, _] => usize::try_from(*i).ok()?.checked_sub(1),
            _ => None,
        },
        _ => None,
    }
}

impl BudgetStore for RedisStore {
    async fn draw(&self, draws: &[Draw]) -> Result<Grant, StoreError> {
        if draws.is_empty() {
            return Ok(Grant::Granted);
        }
        let mut groups = self.groups(draws);
        if groups.len() > 1 {
            return self.draw_split(draws, groups).await;
        }
        let Some(group) = groups.pop() else {
            return Ok(Grant::Granted);
        };
        // One slot: one script call, all or nothing inside Redis.
        let value = self.run("budget draw", &DRAW, draws, &group).await?;
        parse_grant(&value, draws)
    }

    async fn refund(&self, draws: &[Draw]) -> Result<(), StoreError> {
        self.settle(draws, "budget refund", &REFUND).await
    }

    async fn charge(&self, draws: &[Draw]) -> Result<(), StoreError> {
        self.settle(draws, "budget charge", &CHARGE).await
    }
}

impl RedisStore {
    /// Runs a settlement script over the cost draws, one call per slot.
    async fn settle(&self, draws: &[Draw], what: &str, script: &Script) -> Result<(), StoreError> {
        let draws: Vec<Draw> = draws
            .iter()
            .filter(|d| d.limit.is_cost())
            .cloned()
            .collect();
        let groups = self.groups(&draws);
        let answers = join_all(
            groups
                .iter()
                .map(|g| Box::pin(self.run(what, script, &draws, g)) as _)
                .collect(),
        )
        .await;
        answers.into_iter().try_for_each(|a| a.map(drop))
    }
}

impl RedisStore {
    /// The draws grouped by slot (one group on a single node, or when they share a tag).
    fn groups(&self, draws: &[Draw]) -> Vec<Group> {
        let mut groups: Vec<(Option<String>, Group)> = Vec::new();
        for (i, d) in draws.iter().enumerate() {
            let (key, tag) = self.budget_key(d);
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, g)) => {
                    g.draws.push(i);
                    g.keys.push(key);
                }
                None => groups.push((
                    tag,
                    Group {
                        draws: vec![i],
                        keys: vec![key],
                    },
                )),
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
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
        [
            Value::Int(0),
            Value::Int(i),
            Value::Int(wait_us),
            Value::Int(used),
        ] => {
            let draw = usize::try_from(*i)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| draws.get(i))
                .ok_or_else(bad)?;
            let retry_in = u64::try_from(*wait_us).ok().map(Duration::from_micros);
            Ok(Grant::Denied {
                scope: draw.scope,
                retry_in,
                left: left_of(draw, *used),
            })
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
