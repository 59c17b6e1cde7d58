//! Memory per tracked key in the [`MemoryStore`], measured with a counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use tower_retry_guard::budget::{BudgetStore, Draw, Grant, Limit, MemoryStore, Scope};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests measure one process-wide counter: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn under_128_bytes_per_tracked_key() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const KEYS: usize = 200_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        let limit = Limit::Count {
            max: 5,
            ttl: Duration::from_secs(3600),
        };
        // Ids made before measuring: the store's own memory is what counts.
        let draws: Vec<[Draw; 1]> = (0..KEYS)
            .map(|i| {
                [Draw {
                    amount: 1,
                    scope: Scope::User,
                    key: format!("user-{i:08}"),
                    limit,
                }]
            })
            .collect();
        let before = LIVE.load(Ordering::Relaxed);
        for d in &draws {
            assert_eq!(store.draw(d).await, Ok(Grant::Granted));
        }
        let after = LIVE.load(Ordering::Relaxed);
        assert_eq!(store.len(), KEYS);
        let per_key = (after - before) as f64 / KEYS as f64;
        eprintln!("memory store: {per_key:.1} bytes per tracked key ({KEYS} keys)");
        assert!(per_key < 128.0, "{per_key} bytes per key");
    });
}

/// For comparison (BENCHMARKS.md): bytes per key of a bare `DashMap<String, u64>` and a
/// `Mutex<HashMap<String, u64>>` holding the same ids, the key strings included (which the
/// memory store does not keep: it stores a 128-bit hash).
#[test]
fn bytes_per_key_of_plain_maps() {
    const KEYS: usize = 200_000;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ids: Vec<String> = (0..KEYS).map(|i| format!("user-{i:08}")).collect();

    let before = LIVE.load(Ordering::Relaxed);
    let dash = dashmap::DashMap::<String, u64>::new();
    for id in &ids {
        dash.insert(id.clone(), 1);
    }
    let dash_bytes = (LIVE.load(Ordering::Relaxed) - before) as f64 / KEYS as f64;
    drop(dash);

    let before = LIVE.load(Ordering::Relaxed);
    let locked = std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new());
    for id in &ids {
        locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), 1);
    }
    let locked_bytes = (LIVE.load(Ordering::Relaxed) - before) as f64 / KEYS as f64;
    drop(locked);

    eprintln!(
        "DashMap<String, u64>: {dash_bytes:.1} bytes per key; \
         Mutex<HashMap<String, u64>>: {locked_bytes:.1} bytes per key ({KEYS} keys of 13 bytes)"
    );
    // A String key alone is 24 bytes inline plus its heap copy.
    assert!(dash_bytes > 24.0 && locked_bytes > 24.0);
}
