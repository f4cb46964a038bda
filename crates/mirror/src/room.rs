//! The room fills take in the blob store. A fill reserves the bytes it will add (the size its
//! source announced) before it writes any and gives them back once they are committed (or the
//! fill failed), telling the cache each time, so the cache can make room at once rather than at
//! its next timed pass.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::gauge::Gauge;

/// The cache's side of fills, told whenever the bytes fills in flight will add change.
pub trait Room: Send + Sync {
    /// Fills in flight will add `reserved` bytes to the blob store, on top of what it holds:
    /// called as a fill is admitted (its size counted) and as it ends (its bytes now stored,
    /// or given up).
    fn changed(&self, reserved: u64);
}

/// The bytes every fill in flight has reserved, and who to tell.
pub(crate) struct Reservations {
    bytes: AtomicU64,
    gauge: Gauge,
    room: OnceLock<Arc<dyn Room>>,
}

impl Reservations {
    pub(crate) fn new(gauge: Gauge) -> Arc<Reservations> {
        Arc::new(Reservations {
            bytes: AtomicU64::new(0),
            gauge,
            room: OnceLock::new(),
        })
    }

    pub(crate) fn set_room(&self, room: Arc<dyn Room>) {
        let _ = self.room.set(room);
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Reserve `size` bytes until the returned guard drops. A fill of unknown size reserves
    /// nothing, but still tells the cache as it starts and ends.
    pub(crate) fn reserve(self: &Arc<Self>, size: u64) -> Reservation {
        let total = self.bytes.fetch_add(size, Ordering::AcqRel) + size;
        self.gauge.inc_by(size as i64);
        self.tell(total);
        Reservation {
            of: self.clone(),
            size,
        }
    }

    fn tell(&self, total: u64) {
        if let Some(room) = self.room.get() {
            room.changed(total);
        }
    }
}

/// One fill's reservation; dropped once its bytes are in the store or given up.
pub(crate) struct Reservation {
    of: Arc<Reservations>,
    size: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let total = self.of.bytes.fetch_sub(self.size, Ordering::AcqRel) - self.size;
        self.of.gauge.dec_by(self.size as i64);
        self.of.tell(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Told(Mutex<Vec<u64>>);

    impl Room for Told {
        fn changed(&self, reserved: u64) {
            self.0.lock().unwrap().push(reserved);
        }
    }

    #[test]
    fn reservations_add_up_and_the_cache_hears_each_change() {
        let gauge = Gauge::default();
        let r = Reservations::new(gauge.clone());
        let told = Arc::new(Told::default());
        r.set_room(told.clone());
        let a = r.reserve(10);
        let b = r.reserve(5);
        assert_eq!((r.bytes(), gauge.get()), (15, 15));
        drop(a);
        let unknown = r.reserve(0);
        drop(unknown);
        drop(b);
        assert_eq!((r.bytes(), gauge.get()), (0, 0));
        assert_eq!(*told.0.lock().unwrap(), vec![10, 15, 5, 5, 5, 0]);
    }
}
