//! One suite of semantics per store half, with the transcript every store must produce:
//! run against the memory stores, one Redis and a Redis Cluster.

use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower_retry_guard::IdempotencyKey;
use tower_retry_guard::budget::{BudgetStore, Draw, Grant, Limit, Scope, StoreError};
use tower_retry_guard::server::{
    Begin, Claim, ClaimToken, Fingerprint, IdempotencyStore, ScopedKey, Stored,
};
// ---------------------------------------------------------------------------------------
// One suite of semantics, run against the memory stores and Redis.

pub fn d(scope: Scope, key: &str, limit: Limit) -> Draw {
    Draw::one(scope, key, limit)
}

pub fn count(max: u32, ttl: Duration) -> Limit {
    Limit::Count { max, ttl }
}

pub const HOUR: Duration = Duration::from_secs(3600);

/// A grant as a stable line: the scope, and the wait rounded to whole seconds.
pub fn show(g: Result<Grant, impl Debug>) -> String {
    match g {
        Ok(Grant::Granted) => "granted".into(),
        Ok(Grant::Denied {
            scope, retry_in, ..
        }) => match retry_in {
            Some(w) => format!("denied {scope} in {}s", w.as_secs_f64().round()),
            None => format!("denied {scope} never"),
        },
        Err(e) => format!("error {e:?}"),
    }
}

/// Budget scenarios; each draw's answer is one line of the transcript.
pub async fn budget_suite<S: BudgetStore>(s: S) -> Vec<String> {
    let mut out = Vec::new();
    let mut log = |what: &str, g| out.push(format!("{what}: {}", show(g)));

    // A count: 3 draws, the 4th refused until 1 h after the last.
    let t = [d(Scope::Task, "t1", count(3, HOUR))];
    for i in 1..=4 {
        log(&format!("count #{i}"), s.draw(&t).await);
    }
    log(
        "other task",
        s.draw(&[d(Scope::Task, "t2", count(3, HOUR))]).await,
    );
    // The same id in another scope is another key.
    log(
        "same id, user scope",
        s.draw(&[d(Scope::User, "t1", count(1, HOUR))]).await,
    );

    // All or nothing: the user refuses, so the task is not charged.
    let task = d(Scope::Task, "t3", count(2, HOUR));
    let user = d(Scope::User, "u3", count(1, HOUR));
    log("both", s.draw(&[task.clone(), user.clone()]).await);
    for i in 1..=3 {
        log(
            &format!("both again #{i}"),
            s.draw(&[task.clone(), user.clone()]).await,
        );
    }
    log("task alone", s.draw(std::slice::from_ref(&task)).await);
    log(
        "task alone again",
        s.draw(std::slice::from_ref(&task)).await,
    );

    // A rate: 1 a minute, bursts of 3.
    let rate = Limit::Rate {
        tokens: 1,
        per: Duration::from_secs(60),
        burst: 3,
    };
    let u = [d(Scope::User, "u4", rate)];
    for i in 1..=4 {
        log(&format!("rate #{i}"), s.draw(&u).await);
    }
    // A refused rate draw is not charged either.
    let t5 = d(Scope::Task, "t5", count(5, HOUR));
    log(
        "task + empty rate",
        s.draw(&[t5.clone(), u[0].clone()]).await,
    );
    log("task count untouched", s.draw(&[t5]).await);

    // Limits that never allow, or never refill.
    log(
        "count 0",
        s.draw(&[d(Scope::Task, "t6", count(0, HOUR))]).await,
    );
    let no_burst = Limit::Rate {
        tokens: 10,
        per: Duration::from_secs(1),
        burst: 0,
    };
    log("burst 0", s.draw(&[d(Scope::User, "u7", no_burst)]).await);
    let no_refill = Limit::Rate {
        tokens: 0,
        per: Duration::from_secs(1),
        burst: 2,
    };
    for i in 1..=3 {
        log(
            &format!("no refill #{i}"),
            s.draw(&[d(Scope::User, "u8", no_refill)]).await,
        );
    }

    // Expiry: a count is forgotten its ttl after the last draw; a rate refills.
    let short = [d(Scope::Task, "t9", count(1, Duration::from_millis(150)))];
    let fast = [d(
        Scope::User,
        "u9",
        Limit::Rate {
            tokens: 1,
            per: Duration::from_millis(150),
            burst: 1,
        },
    )];
    log("short count", s.draw(&short).await);
    log("fast rate", s.draw(&fast).await);
    log("short count again", s.draw(&short).await);
    log("fast rate again", s.draw(&fast).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    log("short count after its ttl", s.draw(&short).await);
    log("fast rate after refill", s.draw(&fast).await);

    // Racing draws on one key: exactly the limit.
    let race = [d(Scope::Task, "race", count(5, HOUR))];
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            let race = race.clone();
            tokio::spawn(async move { s.draw(&race).await })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        if t.await.expect("draw task") == Ok(Grant::Granted) {
            granted += 1;
        }
    }
    out.push(format!(
        "20 racing draws on a limit of 5: {granted} granted"
    ));
    out
}

pub const EXPECTED_BUDGETS: &[&str] = &[
    "count #1: granted",
    "count #2: granted",
    "count #3: granted",
    "count #4: denied task in 3600s",
    "other task: granted",
    "same id, user scope: granted",
    "both: granted",
    "both again #1: denied user in 3600s",
    "both again #2: denied user in 3600s",
    "both again #3: denied user in 3600s",
    "task alone: granted",
    "task alone again: denied task in 3600s",
    "rate #1: granted",
    "rate #2: granted",
    "rate #3: granted",
    "rate #4: denied user in 60s",
    "task + empty rate: denied user in 60s",
    "task count untouched: granted",
    "count 0: denied task never",
    "burst 0: denied user never",
    "no refill #1: granted",
    "no refill #2: granted",
    "no refill #3: denied user never",
    "short count: granted",
    "fast rate: granted",
    "short count again: denied task in 0s",
    "fast rate again: denied user in 0s",
    "short count after its ttl: granted",
    "fast rate after refill: granted",
    "20 racing draws on a limit of 5: 5 granted",
];

pub fn key(principal: Option<&str>, k: &str) -> ScopedKey {
    ScopedKey::new(principal, IdempotencyKey::new(k).expect("a valid key"))
}

pub fn response(n: u32) -> Stored {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    headers.insert("x-order-id", HeaderValue::from(n));
    Stored {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from(format!("{{\"order\":{n}}}\0\u{ff}")),
    }
}

pub fn show_begin(b: Result<Begin, impl Debug>) -> String {
    match b {
        Ok(Begin::Claimed) => "claimed".into(),
        Ok(Begin::InFlight) => "in flight".into(),
        Ok(Begin::Mismatch) => "mismatch".into(),
        Ok(Begin::Abandoned) => "abandoned".into(),
        Ok(Begin::Done(s)) => {
            let order = s
                .headers
                .get("x-order-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            let same = s == response(order.parse().unwrap_or(0));
            format!("done: order {order}, identical {same}")
        }
        Err(_) => "error".into(),
    }
}

pub fn claim(fingerprint: Fingerprint, lease: Duration) -> Claim {
    Claim {
        token: ClaimToken::random(),
        fingerprint,
        lease,
        keep: HOUR,
        take_over: false,
    }
}

/// Idempotency scenarios; each answer is one line of the transcript.
pub async fn idempotency_suite<S: IdempotencyStore>(s: S) -> Vec<String> {
    let mut out = Vec::new();
    let fp = Fingerprint::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let other = Fingerprint::from_u128(1);
    let lease = Duration::from_secs(60);
    let ttl = HOUR;

    let k = key(None, "k1");
    let first = claim(fp, lease);
    let second = claim(fp, lease);
    let mut line = |what: &str, answer: String| out.push(format!("{what}: {answer}"));
    line("begin", show_begin(s.begin(&k, &first).await));
    line("again", show_begin(s.begin(&k, &second).await));
    line(
        "other request",
        show_begin(s.begin(&k, &claim(other, lease)).await),
    );
    // Fencing: only the claim's own token completes it.
    line(
        "complete, another token",
        format!("{:?}", s.complete(&k, &second, response(7), ttl).await),
    );
    line(
        "complete",
        format!("{:?}", s.complete(&k, &first, response(1), ttl).await),
    );
    line("replay", show_begin(s.begin(&k, &second).await));
    line(
        "other request after",
        show_begin(s.begin(&k, &claim(other, lease)).await),
    );
    // Completing again (a retried write) is not an error and changes nothing; renewing or
    // releasing leaves a finished key alone.
    line(
        "complete again",
        format!("{:?}", s.complete(&k, &first, response(2), ttl).await),
    );
    line("renew done", format!("{:?}", s.renew(&k, &first).await));
    line(
        "release done",
        format!("{:?}", s.release(&k, first.token).await),
    );
    line("replay still first", show_begin(s.begin(&k, &second).await));

    // Principals scope keys.
    let a = key(Some("alice"), "shared");
    let b = key(Some("bob"), "shared");
    let alice = claim(fp, lease);
    line("alice", show_begin(s.begin(&a, &alice).await));
    line("bob", show_begin(s.begin(&b, &claim(other, lease)).await));
    line(
        "alice completes",
        format!("{:?}", s.complete(&a, &alice, response(3), ttl).await),
    );
    line(
        "bob still",
        show_begin(s.begin(&b, &claim(other, lease)).await),
    );

    // Release frees an in-flight key, by its own token only.
    let r = key(None, "k2");
    let held = claim(fp, lease);
    line("claim", show_begin(s.begin(&r, &held).await));
    line(
        "release, another token",
        format!("{:?}", s.release(&r, ClaimToken::random()).await),
    );
    line(
        "still held",
        show_begin(s.begin(&r, &claim(fp, lease)).await),
    );
    line("release", format!("{:?}", s.release(&r, held.token).await));
    line(
        "claim after release",
        show_begin(s.begin(&r, &claim(other, lease)).await),
    );
    // A key the store lost (a restart without persistence): its holder's renewal claims it
    // again and its completion writes it, so retries wait or replay rather than run again.
    let nope = key(None, "nope");
    let lost = claim(fp, lease);
    line(
        "release unknown",
        format!("{:?}", s.release(&nope, lost.token).await),
    );
    line(
        "renew a lost key",
        format!("{:?}", s.renew(&nope, &lost).await),
    );
    line(
        "while renewed",
        show_begin(s.begin(&nope, &claim(fp, lease)).await),
    );
    let gone = key(None, "gone");
    line(
        "complete a lost key",
        format!("{:?}", s.complete(&gone, &lost, response(9), ttl).await),
    );
    line(
        "replay a restored key",
        show_begin(s.begin(&gone, &claim(fp, lease)).await),
    );

    // Leases run out into "abandoned", never "free"; a renewal extends a lease; a late holder
    // nobody took over still completes; a take-over fences the old holder out.
    let short = Duration::from_millis(150);
    let l = key(None, "lease");
    let n = key(None, "renewed");
    let t = key(None, "ttl");
    let late = key(None, "late");
    let lapsed = claim(fp, short);
    let renewed = claim(fp, Duration::from_secs(1));
    let expiring = claim(fp, lease);
    let slow = claim(fp, short);
    line("short lease", show_begin(s.begin(&l, &lapsed).await));
    line("lease to renew", show_begin(s.begin(&n, &renewed).await));
    line(
        "renew",
        format!("{:?}", s.renew(&n, &Claim { lease, ..renewed }).await),
    );
    line("to expire", show_begin(s.begin(&t, &expiring).await));
    line(
        "complete short",
        format!("{:?}", s.complete(&t, &expiring, response(4), short).await),
    );
    line("slow holder", show_begin(s.begin(&late, &slow).await));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    line(
        "after the lease",
        show_begin(s.begin(&l, &claim(fp, lease)).await),
    );
    line(
        "after the lease, other request",
        show_begin(s.begin(&l, &claim(other, lease)).await),
    );
    let rescuer = Claim {
        take_over: true,
        ..claim(fp, lease)
    };
    line("take over", show_begin(s.begin(&l, &rescuer).await));
    line(
        "old holder renews",
        format!("{:?}", s.renew(&l, &lapsed).await),
    );
    line(
        "old holder completes",
        format!("{:?}", s.complete(&l, &lapsed, response(5), ttl).await),
    );
    line(
        "new holder completes",
        format!("{:?}", s.complete(&l, &rescuer, response(6), ttl).await),
    );
    line(
        "replay after take over",
        show_begin(s.begin(&l, &claim(fp, lease)).await),
    );
    line(
        "after the old lease, renewed",
        show_begin(s.begin(&n, &claim(fp, lease)).await),
    );
    line(
        "late holder completes",
        format!("{:?}", s.complete(&late, &slow, response(8), ttl).await),
    );
    line(
        "replay late",
        show_begin(s.begin(&late, &claim(fp, lease)).await),
    );
    line(
        "after the ttl",
        show_begin(s.begin(&t, &claim(other, lease)).await),
    );
    out
}

pub const EXPECTED_IDEMPOTENCY: &[&str] = &[
    "begin: claimed",
    "again: in flight",
    "other request: mismatch",
    "complete, another token: Ok(Lost)",
    "complete: Ok(Held)",
    "replay: done: order 1, identical true",
    "other request after: mismatch",
    "complete again: Ok(Held)",
    "renew done: Ok(Lost)",
    "release done: Ok(Lost)",
    "replay still first: done: order 1, identical true",
    "alice: claimed",
    "bob: claimed",
    "alice completes: Ok(Held)",
    "bob still: in flight",
    "claim: claimed",
    "release, another token: Ok(Lost)",
    "still held: in flight",
    "release: Ok(Held)",
    "claim after release: claimed",
    "release unknown: Ok(Lost)",
    "renew a lost key: Ok(Held)",
    "while renewed: in flight",
    "complete a lost key: Ok(Held)",
    "replay a restored key: done: order 9, identical true",
    "short lease: claimed",
    "lease to renew: claimed",
    "renew: Ok(Held)",
    "to expire: claimed",
    "complete short: Ok(Held)",
    "slow holder: claimed",
    "after the lease: abandoned",
    "after the lease, other request: mismatch",
    "take over: claimed",
    "old holder renews: Ok(Lost)",
    "old holder completes: Ok(Lost)",
    "new holder completes: Ok(Held)",
    "replay after take over: done: order 6, identical true",
    "after the old lease, renewed: in flight",
    "late holder completes: Ok(Held)",
    "replay late: done: order 8, identical true",
    "after the ttl: claimed",
];

// ---------------------------------------------------------------------------------------
// Cost limits under races: many concurrent decisions of random (seeded) cost on one task
// and one user, each decision the task's count, the task's cost and the user's cost rate,
// all or nothing.

/// What a cost race ended with.
#[derive(Debug)]
pub struct CostRace {
    /// Units granted (the sum of the amounts of granted decisions).
    pub granted: u64,
    /// Decisions granted and refused.
    pub grants: u32,
    pub refusals: u32,
}

/// The task's cost limit in [`cost_race`].
pub const RACE_TASK_COST: u64 = 5_000;
/// The user's cost burst in [`cost_race`] (it refills 1 unit an hour: not within a run).
pub const RACE_USER_BURST: u64 = 4_000;

pub fn race_draws(task: &str, user: &str, amount: u64) -> [Draw; 3] {
    [
        d(Scope::Task, task, count(10_000, HOUR)),
        Draw {
            amount,
            ..d(
                Scope::TaskCost,
                task,
                Limit::Cost {
                    max: RACE_TASK_COST,
                    ttl: HOUR,
                },
            )
        },
        Draw {
            amount,
            ..d(
                Scope::UserCost,
                user,
                Limit::CostRate {
                    units: RACE_USER_BURST,
                    per: Duration::from_secs(4_000 * 3600),
                    burst: RACE_USER_BURST,
                },
            )
        },
    ]
}

/// `n` decisions at once on one task and one user, of seeded random cost 1..=600;
/// every answer checked. Draws on the store from many tasks of a multi-threaded runtime.
pub async fn cost_race<S: BudgetStore>(
    s: &S,
    task: &str,
    user: &str,
    n: u32,
    seed: u64,
) -> CostRace {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    let mut rng = SmallRng::seed_from_u64(seed);
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let amount = rng.random_range(1..=600u64);
            let (s, draws) = (s.clone(), race_draws(task, user, amount));
            tokio::spawn(async move { (amount, s.draw(&draws).await) })
        })
        .collect();
    let mut race = CostRace {
        granted: 0,
        grants: 0,
        refusals: 0,
    };
    for c in calls {
        match c.await.expect("a draw") {
            (amount, Ok(Grant::Granted)) => {
                race.granted += amount;
                race.grants += 1;
            }
            (amount, Ok(Grant::Denied { scope, left, .. })) => {
                assert!(
                    matches!(scope, Scope::TaskCost | Scope::UserCost),
                    "{scope}"
                );
                // A refusal is for an amount that did not fit what was left then.
                let left = left.expect("a cost refusal says what was left");
                assert!(left < amount, "{left} left, {amount} refused");
                race.refusals += 1;
            }
            (_, Err(e)) => panic!("{e}"),
        }
    }
    race
}

/// Two races on one task (two users: the first race is bound by its user's burst, the
/// second by what the task has left), then the exact remainders: what each key has left is
/// its limit minus what was granted, to the unit.
pub async fn cost_race_suite<S: BudgetStore>(s: S, seed: u64) {
    let a = cost_race(&s, "race-t", "race-a", 40, seed).await;
    let b = cost_race(&s, "race-t", "race-b", 40, seed ^ 0x5eed).await;
    assert!(a.grants > 0 && a.refusals > 0, "{a:?}");
    assert!(b.grants > 0 && b.refusals > 0, "{b:?}");
    assert!(a.granted <= RACE_USER_BURST, "{a:?}");
    let task_spent = a.granted + b.granted;
    assert!(task_spent <= RACE_TASK_COST, "{a:?} {b:?}");
    let cost = |scope, id: &str, limit, amount| Draw {
        amount,
        ..d(scope, id, limit)
    };
    let task_limit = Limit::Cost {
        max: RACE_TASK_COST,
        ttl: HOUR,
    };
    let user_limit = race_draws("", "", 0)[2].limit;
    for (scope, id, limit, left) in [
        (
            Scope::TaskCost,
            "race-t",
            task_limit,
            RACE_TASK_COST - task_spent,
        ),
        (
            Scope::UserCost,
            "race-a",
            user_limit,
            RACE_USER_BURST - a.granted,
        ),
    ] {
        if left > 0 {
            assert_eq!(
                s.draw(&[cost(scope, id, limit, left)]).await,
                Ok(Grant::Granted),
                "{scope} {id}: {left} should be left"
            );
        }
        match s.draw(&[cost(scope, id, limit, 1)]).await {
            Ok(Grant::Denied {
                scope: refused,
                left: Some(0),
                ..
            }) => assert_eq!(refused, scope),
            other => panic!("{scope} {id}: nothing should be left, got {other:?}"),
        }
    }
}

/// Settling cost draws: a refund makes room, a charge goes past the limit.
pub async fn settle_suite<S: BudgetStore>(s: S) {
    let task = |amount| Draw {
        amount,
        ..d(
            Scope::TaskCost,
            "settle-t",
            Limit::Cost {
                max: 1_000,
                ttl: HOUR,
            },
        )
    };
    let user = |amount| Draw {
        amount,
        ..race_draws("", "settle-u", 0)[2].clone()
    };
    let left = |g: Result<Grant, StoreError>| match g {
        Ok(Grant::Denied { left, .. }) => left,
        other => panic!("expected a refusal, got {other:?}"),
    };
    for (what, of, max) in [
        ("task", &task as &dyn Fn(u64) -> Draw, 1_000),
        ("user", &user, RACE_USER_BURST),
    ] {
        assert_eq!(s.draw(&[of(600)]).await, Ok(Grant::Granted), "{what}");
        assert_eq!(left(s.draw(&[of(max)]).await), Some(max - 600), "{what}");
        // Reserved 600, cost 200: 400 back.
        assert_eq!(s.refund(&[of(400)]).await, Ok(()), "{what}");
        assert_eq!(s.draw(&[of(max - 200)]).await, Ok(Grant::Granted), "{what}");
        assert_eq!(left(s.draw(&[of(1)]).await), Some(0), "{what}");
        // Cost more than reserved: charged past the limit, and given back exactly.
        assert_eq!(s.charge(&[of(300)]).await, Ok(()), "{what}");
        assert_eq!(s.refund(&[of(500)]).await, Ok(()), "{what}");
        assert_eq!(left(s.draw(&[of(201)]).await), Some(200), "{what}");
        assert_eq!(s.draw(&[of(200)]).await, Ok(Grant::Granted), "{what}");
    }
}
