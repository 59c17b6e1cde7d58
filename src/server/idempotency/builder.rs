//! [`IdempotencyLayerBuilder`]: the settings of an [`IdempotencyLayer`], checked when built.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::request::Parts;
use http::{Method, StatusCode};

use super::{Config, IdempotencyLayer, OversizedResponse, UnknownOutcome};
use crate::server::config::ConfigError;
use crate::server::store::IdempotencyStore;

/// The shortest lease: renewals every third of it must reach the store in time.
const MIN_LEASE: Duration = Duration::from_millis(100);
/// The longest TTL (a year).
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// The largest body read or stored (1 GiB).
const MAX_BODY: usize = 1 << 30;

/// Builds an [`IdempotencyLayer`]; [`build`](Self::build) checks the settings.
#[derive(Debug)]
pub struct IdempotencyLayerBuilder<St> {
    store: St,
    config: Config,
}

impl<St> IdempotencyLayerBuilder<St> {
    pub(super) fn new(store: St) -> Self {
        IdempotencyLayerBuilder {
            store,
            config: Config::default(),
        }
    }

    /// Where keys live (default: a new [`MemoryIdempotencyStore`](crate::server::MemoryIdempotencyStore)).
    pub fn store<St2: IdempotencyStore>(self, store: St2) -> IdempotencyLayerBuilder<St2> {
        IdempotencyLayerBuilder {
            store,
            config: self.config,
        }
    }

    /// The request header carrying the key (default `Idempotency-Key`).
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The methods whose requests must carry a key (default `POST`, `PATCH`); others get 400
    /// without one. A key on another unsafe method (`PUT`, `DELETE`, ...) is honoured too;
    /// a key on a safe method (`GET`, `HEAD`, ...) is ignored, so naming one is an error.
    pub fn require_key_for(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.required = methods.into_iter().collect();
        self
    }

    /// How long a finished result (or the record of a claim) is kept (default 24 h, as
    /// Stripe keeps keys; at least the lease, at most a year).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long a claim holds without a renewal (default 60 s, at least 100 ms). The layer
    /// renews it every third of it while the handler runs and its response streams. A claim
    /// whose lease runs out (its process died, or lost the store for a whole lease) is
    /// abandoned: see [`UnknownOutcome`]; it is never simply claimed again.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// The longest a claim is renewed (default 10 min): a handler still running after it
    /// loses its claim to [`UnknownOutcome`], and a response still streaming after it is
    /// relayed to its end but not recorded (retries get a "not replayable" answer), so no
    /// key is held forever by a stream that never ends.
    pub fn max_claim_time(mut self, max: Duration) -> Self {
        self.config.max_claim_time = max;
        self
    }

    /// The largest request body read to fingerprint a keyed request (default 1 MiB, at most
    /// 1 GiB); a larger one gets 413.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config.max_request_body = bytes;
        self
    }

    /// The largest response body stored (default 1 MiB, at most 1 GiB); see
    /// [`OversizedResponse`]. Responses are relayed to the client as they are produced,
    /// whatever their size.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config.max_response_body = bytes;
        self
    }

    /// Whether 5xx responses (other than the [`release_statuses`](Self::release_statuses))
    /// are stored and replayed (default `true`).
    ///
    /// As Stripe does once execution began: a handler that failed with 500 may have done part
    /// of its side effects, and running it again could do them twice. A handler that knows it
    /// did nothing can say so per response with [`ReleaseKey`](super::ReleaseKey)(super::ReleaseKey). With `false`, every 5xx
    /// releases the key and a retry runs the request again.
    pub fn store_server_errors(mut self, store: bool) -> Self {
        self.config.store_server_errors = store;
        self
    }

    /// The statuses that mean "not processed, try again" and release the key instead of
    /// being stored (default 429, 503 and 529), so the client's retry gets a fresh attempt
    /// rather than the replayed refusal.
    pub fn release_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config.release_statuses = statuses.into_iter().collect();
        self
    }

    /// What to do with a response too large to store (default
    /// [`OversizedResponse::ReplayError`]).
    pub fn on_oversized_response(mut self, what: OversizedResponse) -> Self {
        self.config.oversized = what;
        self
    }

    /// What to do when a retry finds its first request abandoned (default
    /// [`UnknownOutcome::refuse`]).
    pub fn on_unknown_outcome(mut self, what: UnknownOutcome) -> Self {
        self.config.unknown = what;
        self
    }

    /// Scopes keys by principal (a user, an API key, a tenant) read from the request: a key
    /// replays only responses of the same principal. `None` is the global scope (shared by
    /// every request without a principal), unless [`principal_required`](Self::principal_required).
    pub fn principal<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config.principal = Some(Arc::new(f));
        self
    }

    /// Refuses a keyed request whose principal cannot be read with 401, instead of putting
    /// it in the global scope. Needs [`principal`](Self::principal).
    pub fn principal_required(mut self) -> Self {
        self.config.principal_required = true;
        self
    }

    /// The layer, or the first setting that cannot work.
    pub fn build(self) -> Result<IdempotencyLayer<St>, ConfigError> {
        let c = &self.config;
        let err = |setting, problem: &str| {
            Err(ConfigError::new(
                "idempotency layer",
                setting,
                problem.to_owned(),
            ))
        };
        if c.lease < MIN_LEASE {
            return err(
                "lease",
                &format!(
                    "is {:?}: a claim must hold at least {MIN_LEASE:?} (it is renewed every third of it)",
                    c.lease
                ),
            );
        }
        if c.ttl < c.lease || c.ttl > MAX_TTL {
            return err(
                "ttl",
                &format!(
                    "is {:?}: it must be at least the lease ({:?}) and at most a year",
                    c.ttl, c.lease
                ),
            );
        }
        if c.max_claim_time < c.lease {
            return err(
                "max_claim_time",
                &format!(
                    "is {:?}: it must be at least the lease ({:?})",
                    c.max_claim_time, c.lease
                ),
            );
        }
        if c.max_request_body > MAX_BODY {
            return err("max_request_body", "is over 1 GiB");
        }
        if c.max_response_body > MAX_BODY {
            return err("max_response_body", "is over 1 GiB");
        }
        if let Some(m) = c.required.iter().find(|m| m.is_safe()) {
            return err(
                "require_key_for",
                &format!("names {m}, a safe method: keys on safe methods are ignored"),
            );
        }
        if c.principal_required && c.principal.is_none() {
            return err(
                "principal_required",
                "needs a `principal` function to read the principal with",
            );
        }
        Ok(IdempotencyLayer {
            store: self.store,
            config: Arc::new(self.config),
        })
    }
}
