//! One logical call: what is decided once, before the first attempt (side effect, key,
//! operation name, deadline, the copy for a retry), and what the call holds while it runs.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::config::Config;
use crate::backoff::CallBackoff;
use crate::budget::{ActiveCall, RetrySlot};
use crate::classify::ErrorKind;
use crate::observe::{OpHandle, OpKey, Reservation, default_operation};
use crate::policy::RetryPolicy;
use crate::request::{IdempotencyKey, InvalidKey, Operation, RetryRequest, SideEffect};

/// One logical call, from its first attempt to its end.
pub(crate) struct Call<Req> {
    /// The copy the next attempt sends, taken before the first attempt was stamped; a retry
    /// stamps it (key, attempt number) and may change it.
    pub(crate) next: Option<Req>,
    /// Attempts sent so far (1 while the first runs).
    pub(crate) attempts: u32,
    pub(crate) started: Instant,
    /// `started + max_total_time`: nothing of the call runs past it.
    pub(crate) deadline: Instant,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) side_effect: SideEffect,
    pub(crate) op: OpName,
    pub(crate) last_kind: Option<ErrorKind>,
    /// What only a call that failed carries (boxed: the success path moves less).
    pub(crate) retried: Option<Box<Retried>>,
    /// The span of the attempt in flight (none when untraced); dropped, so closed, when the
    /// attempt answers.
    pub(crate) attempt_span: tracing::Span,
    /// Counts the call as active until it is dropped, a panicking inner `call` included.
    _active: ActiveCall,
}

/// A call refused before its first attempt: its request's key is invalid (boxed: the
/// success path moves less).
pub(crate) type Refused = Box<RefusedCall>;

/// What a refused call reports.
pub(crate) struct RefusedCall {
    pub(crate) op: OpName,
    pub(crate) invalid: InvalidKey,
}

/// The part of a call that exists once an attempt failed.
pub(crate) struct Retried {
    /// The call's own random stream for jitter.
    pub(crate) backoff: CallBackoff,
    pub(crate) total_delay: Duration,
    /// The delay before the retry being prepared or in flight.
    pub(crate) delay: Duration,
    /// The retry in flight's slot, freed when it answers or the call ends.
    pub(crate) slot: Option<RetrySlot>,
    /// The cost of the retries sent so far (those whose cost was known).
    pub(crate) cost: u64,
    /// What the last retry sent reserved from the cost budgets (for a settlement).
    pub(crate) reservation: Option<Box<Reservation>>,
}

impl<Req: RetryRequest> Call<Req> {
    /// Decides, once, the side effect, the key, the operation and the deadline, takes the
    /// copy for a retry, and stamps the first attempt (key, attempt 0). An invalid key is a
    /// refusal: nothing is sent.
    #[inline]
    pub(crate) fn start<C, H>(config: &Config<C, H>, request: &mut Req) -> Result<Self, Refused> {
        let side_effect = side_effect_of(config, request);
        let op = OpName::of(config, request);
        let names = &config.names;
        // One rule decides the key (`RetryRequest::idempotency_key`: header and extension
        // must agree), whatever the side effect; the closure and minting only for a
        // side-effecting request that carries none. The key chosen is stamped, so the key
        // reported is the key sent.
        let key = match request.idempotency_key(names) {
            Ok(Some(existing)) => Some(existing),
            Ok(None) if side_effect == SideEffect::SideEffecting => {
                match config.key_fn.as_ref().and_then(|f| f(&request.view())) {
                    Some(derived) => Some(derived),
                    None if config.mint_keys => Some(IdempotencyKey::generate()),
                    None => None,
                }
            }
            Ok(None) => None,
            Err(invalid) => return Err(Box::new(RefusedCall { op, invalid })),
        };
        // The copy is taken before the stamps: a retry stamps its own, and the success path
        // copies (and drops) one header less.
        let next = if config.policy.max_retries() == 0 {
            None
        } else {
            let copy = request.try_clone();
            if copy.is_none() {
                warn_unclonable(config, &op);
            }
            copy
        };
        if let Some(key) = &key {
            request.set_idempotency_key(key, names);
        }
        request.set_attempt(0, names);
        // One clock read serves the deadline, the process ratio and, for a call answered
        // at once, its end.
        let started = Instant::now();
        config.budgets.on_call(started);
        let deadline = started
            .checked_add(config.policy.max_total_time())
            .unwrap_or_else(|| started + Duration::from_secs(86_400));
        Ok(Call {
            next,
            attempts: 1,
            started,
            deadline,
            key,
            side_effect,
            op,
            last_kind: None,
            retried: None,
            attempt_span: tracing::Span::none(),
            _active: config.budgets.active_call(),
        })
    }
}

impl<Req> Call<Req> {
    /// The attempt in flight is a retry (its result feeds the adaptive ratio).
    pub(crate) fn in_retry(&self) -> bool {
        self.attempts > 1
    }

    /// An attempt failed: the call gets its failure-path state (its random stream is drawn
    /// now, never on the success path).
    pub(crate) fn failed(&mut self, policy: &RetryPolicy) -> &mut Retried {
        self.retried.get_or_insert_with(|| {
            Box::new(Retried {
                backoff: policy.call_backoff(),
                total_delay: Duration::ZERO,
                delay: Duration::ZERO,
                slot: None,
                cost: 0,
                reservation: None,
            })
        })
    }

    /// Time slept between attempts so far.
    pub(crate) fn total_delay(&self) -> Duration {
        self.retried
            .as_ref()
            .map_or(Duration::ZERO, |r| r.total_delay)
    }

    /// The cost of the retries sent so far.
    pub(crate) fn retry_cost(&self) -> u64 {
        self.retried.as_ref().map_or(0, |r| r.cost)
    }

    /// The delay before the retry being prepared or in flight.
    pub(crate) fn delay(&self) -> Duration {
        self.retried.as_ref().map_or(Duration::ZERO, |r| r.delay)
    }
}

/// The operation's name, decided once per call: the stats entry it is counted under, and
/// its own name when that entry does not carry it (past the stats' cap).
pub(crate) struct OpName {
    pub(crate) handle: OpHandle,
    own: Option<Operation>,
}

impl OpName {
    /// The one chain that names an operation: the [`Operation`] extension (a route
    /// template), the layer's closure, the request's own name, else the method and path
    /// with ids collapsed (hashed without being formatted), else `call`.
    fn of<Req: RetryRequest, C, H>(config: &Config<C, H>, request: &Req) -> Self {
        let view = request.view();
        let named = match view.extensions.and_then(|e| e.get::<Operation>()) {
            Some(op) => Some(Cow::Borrowed(op)),
            None => config
                .operation_fn
                .as_ref()
                .and_then(|f| f(&view))
                .or_else(|| request.operation())
                .map(Cow::Owned),
        };
        let stats = &config.stats;
        match (named, view.method, view.uri) {
            (Some(op), _, _) => {
                let handle = stats.handle(OpKey::of_name(op.as_str()), || op.as_str().to_owned());
                let own = handle.is_overflow().then(|| op.into_owned());
                OpName { handle, own }
            }
            (None, Some(method), Some(uri)) => {
                let path = uri.path();
                let handle = stats.handle_of_path(method, path);
                let own = handle
                    .is_overflow()
                    .then(|| default_operation(method, path));
                OpName { handle, own }
            }
            (None, _, _) => {
                let handle = stats.handle(OpKey::of_name("call"), || "call".to_owned());
                let own = handle.is_overflow().then(|| Operation::from_static("call"));
                OpName { handle, own }
            }
        }
    }

    /// The name, for logs and errors.
    pub(crate) fn as_str(&self) -> &str {
        match &self.own {
            Some(op) => op.as_str(),
            None => self.handle.name(),
        }
    }

    /// The name, for a [`RetryInfo`](crate::RetryInfo).
    pub(crate) fn to_operation(&self) -> Operation {
        match &self.own {
            Some(op) => op.clone(),
            None => Operation(Cow::Owned(self.handle.name().to_owned())),
        }
    }
}

/// The side effect: the [`SideEffect`] extension, the layer's closure, else the request's own.
fn side_effect_of<Req: RetryRequest, C, H>(config: &Config<C, H>, request: &Req) -> SideEffect {
    let view = request.view();
    if let Some(s) = view.extensions.and_then(|e| e.get::<SideEffect>()) {
        return *s;
    }
    if let Some(s) = config.side_effect_fn.as_ref().and_then(|f| f(&view)) {
        return s;
    }
    request.side_effect()
}

fn warn_unclonable<C, H>(config: &Config<C, H>, op: &OpName) {
    // Warn once per service, then at debug: a streaming endpoint would flood the logs.
    if !config.warned_unclonable.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            target: "tower_retry_guard",
            operation = op.as_str(),
            "retries are off for this request: it cannot be cloned (a streaming body?); \
             buffer the body to make it replayable (further occurrences are logged at debug)"
        );
    } else {
        tracing::debug!(
            target: "tower_retry_guard",
            operation = op.as_str(),
            "retries are off for this request: it cannot be cloned"
        );
    }
}
