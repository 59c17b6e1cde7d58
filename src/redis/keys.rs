//! Key names: the single-node layout, and the cluster layout with hash tags (see the key
//! table in the module docs for both, and why).

use xxhash_rust::xxh3::xxh3_64;

use super::RedisStore;
use crate::budget::{Draw, Limit};
use crate::server::ScopedKey;

/// On a cluster, each principal's idempotency keys (and its share of keys) are spread over
/// this many slots.
pub(super) const SHARE_BUCKETS: u64 = 16;

/// Where one idempotency key and its principal's share set live.
pub(super) struct IdempotencyKeys {
    /// The key's hash.
    pub(super) key: String,
    /// The sorted set of the keys its principal holds (in the same slot on a cluster).
    pub(super) share: String,
    /// How many live keys that set may hold (`0`: no limit).
    pub(super) cap: u64,
}

impl RedisStore {
    /// The key of one budget draw, and (on a cluster) its hash tag: draws with the same tag
    /// share a slot, so they go into one script call.
    pub(super) fn budget_key(&self, draw: &Draw) -> (String, Option<String>) {
        let kind = match draw.limit {
            Limit::Count { .. } => "c",
            Limit::Rate { .. } => "r",
            Limit::Cost { .. } => "u",
            Limit::CostRate { .. } => "v",
        };
        // Any id, bounded: a long or unusual one under its digest (as `Budgets` sends it);
        // either way no `{` or `}`, so the tag below is the whole `<scope>:<id>`.
        let id = crate::budget::budget_key(&draw.key);
        let scope = draw.scope.as_str();
        if self.conn.is_cluster() {
            // A task's (user's) count and cost share a slot (one script call), under keys
            // that differ by scope.
            let tag = format!("{}:{id}", draw.scope.id_scope().as_str());
            let own = if draw.scope == draw.scope.id_scope() {
                String::new()
            } else {
                format!(":{scope}")
            };
            (format!("{}b:{kind}{own}:{{{tag}}}", self.prefix), Some(tag))
        } else {
            (format!("{}b:{kind}:{scope}:{id}", self.prefix), None)
        }
    }

    /// The keys an idempotency script touches for `key`.
    pub(super) fn idempotency_keys(&self, key: &ScopedKey) -> IdempotencyKeys {
        let storage = key.storage_key();
        let max = self.max_keys_per_principal;
        if !self.conn.is_cluster() {
            let share = match key.principal() {
                None => format!("{}ip:g", self.prefix),
                Some(p) => format!("{}ip:p:{}:{p}", self.prefix, p.len()),
            };
            return IdempotencyKeys {
                key: format!("{}i:{storage}", self.prefix),
                share,
                cap: max,
            };
        }
        // The tag: the principal (by its hash: a principal may hold `}`) and one of 16
        // buckets picked by the key, so one principal's keys spread over 16 slots and each
        // bucket's share set sits in its keys' slot.
        let bucket = xxh3_64(storage.as_bytes()) % SHARE_BUCKETS;
        let (tag, owner) = match key.principal() {
            None => (format!("g:{bucket:x}"), String::new()),
            Some(p) => (
                format!("p:{:016x}:{bucket:x}", xxh3_64(p.as_bytes())),
                format!(":{}:{p}", p.len()),
            ),
        };
        IdempotencyKeys {
            key: format!("{}i:{{{tag}}}:{storage}", self.prefix),
            share: format!("{}ip:{{{tag}}}{owner}", self.prefix),
            cap: max.div_ceil(SHARE_BUCKETS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Scope;
    use crate::request::IdempotencyKey;
    use std::time::Duration;

    /// The part of a key Redis hashes on a cluster.
    fn tag(key: &str) -> &str {
        let open = key.find('{').map_or(0, |i| i + 1);
        let close = key[open..].find('}').map_or(key.len(), |i| open + i);
        &key[open..close]
    }

    fn draw(scope: Scope, id: &str) -> Draw {
        Draw::one(
            scope,
            id,
            Limit::Count {
                max: 1,
                ttl: Duration::from_secs(1),
            },
        )
    }

    fn scoped(principal: Option<&str>, k: &str) -> ScopedKey {
        ScopedKey::new(principal, IdempotencyKey::new(k).expect("a key"))
    }

    #[tokio::test]
    async fn the_single_node_layout_is_unchanged() {
        let store = RedisStore::new("redis://127.0.0.1:1/").expect("a lazy store");
        assert_eq!(
            store.budget_key(&draw(Scope::Task, "t")).0,
            "trg:b:c:task:t"
        );
        let k = store.idempotency_keys(&scoped(Some("alice"), "k"));
        assert_eq!(
            (k.key.as_str(), k.share.as_str()),
            ("trg:i:p:5:alice:k", "trg:ip:p:5:alice")
        );
        assert_eq!(store.idempotency_keys(&scoped(None, "k")).share, "trg:ip:g");
    }

    #[cfg(feature = "redis-cluster")]
    #[tokio::test]
    async fn on_a_cluster_each_call_is_one_slot_and_a_principal_spreads() {
        let store = RedisStore::cluster(["redis://127.0.0.1:1/"]).expect("a lazy store");
        let (task, t) = store.budget_key(&draw(Scope::Task, "t"));
        let (user, _) = store.budget_key(&draw(Scope::User, "t"));
        assert_eq!((tag(&task), t.as_deref()), ("task:t", Some("task:t")));
        assert_eq!(tag(&user), "user:t");
        let (cost, c) = store.budget_key(&draw(Scope::TaskCost, "t"));
        assert_eq!((tag(&cost), c.as_deref()), ("task:t", Some("task:t")));
        assert_ne!(cost, task);
        let mut tags = std::collections::HashSet::new();
        for i in 0..200 {
            for p in [Some("a}b{c"), None] {
                let k = store.idempotency_keys(&scoped(p, &format!("k{i}")));
                assert_eq!(tag(&k.key), tag(&k.share), "{k:?}", k = k.key);
                assert_eq!(k.cap, DEFAULT_MAX.div_ceil(SHARE_BUCKETS));
                tags.insert(tag(&k.key).to_owned());
            }
        }
        assert_eq!(tags.len(), 2 * SHARE_BUCKETS as usize);
        // Two principals never share a share set.
        let a = store.idempotency_keys(&scoped(Some("a"), "k"));
        let b = store.idempotency_keys(&scoped(Some("b"), "k"));
        assert_ne!(a.share, b.share);
    }

    const DEFAULT_MAX: u64 = 25_000;
}
