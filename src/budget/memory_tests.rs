//! Unit tests of the memory store.
use super::*;
use crate::budget::Limit;
use std::time::Duration;

fn draw(scope: Scope, key: &str, limit: Limit) -> Draw {
    Draw::one(scope, key, limit)
}

const COUNT: Limit = Limit::Count {
    max: 2,
    ttl: Duration::from_secs(60),
};

#[test]
fn entry_is_compact() {
    assert_eq!(std::mem::size_of::<(Key, Entry)>(), 48);
}

#[tokio::test(start_paused = true)]
async fn count_expires_after_ttl_since_last_draw() {
    let s = MemoryStore::new();
    let d = [draw(Scope::Task, "t", COUNT)];
    assert_eq!(s.draw(&d).await, Ok(Grant::Granted));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(s.draw(&d).await, Ok(Grant::Granted));
    let Ok(Grant::Denied {
        scope,
        retry_in,
        left,
    }) = s.draw(&d).await
    else {
        panic!("third draw granted")
    };
    assert_eq!(scope, Scope::Task);
    assert_eq!(retry_in, Some(Duration::from_secs(60)));
    assert_eq!(left, Some(0));
    // 60 s after the first draw, but only 30 s after the last: still counted.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(matches!(s.draw(&d).await, Ok(Grant::Denied { .. })));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(s.draw(&d).await, Ok(Grant::Granted));
}

#[tokio::test(start_paused = true)]
async fn all_or_nothing() {
    let s = MemoryStore::new();
    let task = draw(Scope::Task, "t", COUNT);
    let user = draw(
        Scope::User,
        "u",
        Limit::Count {
            max: 1,
            ttl: Duration::from_secs(60),
        },
    );
    assert_eq!(
        s.draw(&[task.clone(), user.clone()]).await,
        Ok(Grant::Granted)
    );
    // The user refuses: the task's draw is given back.
    assert!(matches!(
        s.draw(&[task.clone(), user.clone()]).await,
        Ok(Grant::Denied {
            scope: Scope::User,
            ..
        })
    ));
    assert_eq!(
        s.draw(std::slice::from_ref(&task)).await,
        Ok(Grant::Granted)
    );
    assert!(matches!(
        s.draw(&[task]).await,
        Ok(Grant::Denied {
            scope: Scope::Task,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn refused_new_key_is_not_stored() {
    let s = MemoryStore::new();
    let zero = Limit::Count {
        max: 0,
        ttl: Duration::from_secs(1),
    };
    assert_eq!(
        s.draw(&[draw(Scope::Task, "t", zero)]).await,
        Ok(Grant::Denied {
            scope: Scope::Task,
            retry_in: None,
            left: Some(0),
        })
    );
    assert!(s.is_empty());
}

#[tokio::test(start_paused = true)]
async fn cost_sum_takes_amounts_and_says_what_is_left() {
    let s = MemoryStore::new();
    let limit = Limit::Cost {
        max: 100,
        ttl: Duration::from_secs(60),
    };
    let of = |amount| Draw {
        amount,
        ..draw(Scope::TaskCost, "t", limit)
    };
    assert_eq!(s.draw(&[of(70)]).await, Ok(Grant::Granted));
    assert_eq!(
        s.draw(&[of(40)]).await,
        Ok(Grant::Denied {
            scope: Scope::TaskCost,
            retry_in: Some(Duration::from_secs(60)),
            left: Some(30),
        })
    );
    assert_eq!(s.draw(&[of(30)]).await, Ok(Grant::Granted));
    // More than the limit ever allows: no wait helps.
    assert!(matches!(
        s.draw(&[of(101)]).await,
        Ok(Grant::Denied { retry_in: None, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn cost_rate_refills_in_units() {
    let s = MemoryStore::new();
    let limit = Limit::CostRate {
        units: 1000,
        per: Duration::from_secs(1),
        burst: 1000,
    };
    let of = |amount| Draw {
        amount,
        ..draw(Scope::UserCost, "u", limit)
    };
    assert_eq!(s.draw(&[of(800)]).await, Ok(Grant::Granted));
    let Ok(Grant::Denied { left, retry_in, .. }) = s.draw(&[of(300)]).await else {
        panic!("300 of 200 left granted")
    };
    assert_eq!(left, Some(200));
    assert_eq!(retry_in, Some(Duration::from_millis(100)));
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(s.draw(&[of(300)]).await, Ok(Grant::Granted));
}
