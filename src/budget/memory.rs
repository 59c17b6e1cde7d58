//! The in-memory budget store. (Interim version: one mutex; replaced by the DashMap one.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::{BudgetStore, Draw, Grant, Limit, Scope, StoreError};

/// Budgets in this process's memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    #[allow(clippy::type_complexity)]
    inner: Arc<Mutex<HashMap<(Scope, String), (f64, Instant)>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }
}

impl BudgetStore for MemoryStore {
    async fn draw(&self, draws: &[Draw]) -> Result<Grant, StoreError> {
        let now = Instant::now();
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Vec::with_capacity(draws.len());
        for d in draws {
            let entry = map.get(&(d.scope, d.key.clone())).copied();
            let value = match d.limit {
                Limit::Count { max, ttl } => {
                    let used = match entry {
                        Some((u, at)) if now.duration_since(at) < ttl => u,
                        _ => 0.0,
                    };
                    if used + 1.0 > max as f64 {
                        return Ok(Grant::Denied {
                            scope: d.scope,
                            retry_in: None,
                        });
                    }
                    used + 1.0
                }
                Limit::Rate { tokens, per, burst } => {
                    let have = match entry {
                        Some((t, at)) => (t + now.duration_since(at).as_secs_f64()
                            / per.as_secs_f64()
                            * tokens as f64)
                            .min(burst as f64),
                        None => burst as f64,
                    };
                    if have < 1.0 {
                        return Ok(Grant::Denied {
                            scope: d.scope,
                            retry_in: None,
                        });
                    }
                    have - 1.0
                }
            };
            next.push(((d.scope, d.key.clone()), (value, now)));
        }
        for (k, v) in next {
            map.insert(k, v);
        }
        Ok(Grant::Granted)
    }
}
