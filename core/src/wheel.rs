//! A hierarchical timing wheel over integer millisecond ticks.
//!
//! After Varghese & Lauck, "Hashed and Hierarchical Timing Wheels" (1987),
//! in the form tokio's time driver uses: six levels of 64 slots, an
//! occupancy bitmap per level, and the next occupied slot found with
//! `trailing_zeros` instead of a scan.
//!
//! | level | slot width      | level span        |
//! |-------|-----------------|-------------------|
//! | 0     | 1 ms            | 64 ms             |
//! | 1     | 64 ms           | ~4.1 s            |
//! | 2     | ~4.1 s          | ~4.4 min          |
//! | 3     | ~4.4 min        | ~4.7 h            |
//! | 4     | ~4.7 h          | ~12.4 days        |
//! | 5     | ~12.4 days      | ~2.2 years        |
//!
//! An entry sits at the level of the highest bit in which its deadline
//! differs from the wheel's `elapsed` tick, so lower levels always hold
//! earlier deadlines. When time reaches a slot of a level above 0, its
//! entries are re-placed relative to the new `elapsed` (cascading). Deadlines
//! beyond the top level's span wrap into a top-level slot and are re-placed
//! each time that slot comes round, so years ahead cost nothing until then.
//! Deadlines at or before `elapsed` go to a ready list and expire on the next
//! poll.
//!
//! Entries live in a slab with intrusive doubly linked lists, so insert and
//! cancel by handle are O(1); a handle carries a generation, so a stale
//! handle cancels nothing.
//!
//! Invariants: every live entry is in exactly one list (a slot or ready);
//! a slot's occupancy bit is set iff its list is non-empty; `elapsed` never
//! decreases; [`TimerWheel::poll`] yields an entry only once its deadline is
//! at or before the `now` it was given.

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = (SLOTS as u64) - 1;
/// The span of the whole wheel: beyond it, deadlines wrap in the top level.
const WHEEL_SPAN: u64 = 1 << (SLOT_BITS as u64 * LEVELS as u64);
const NIL: u32 = u32::MAX;
const LOC_READY: u8 = LEVELS as u8;
const LOC_FREE: u8 = u8::MAX;

/// Refers to one inserted timer; use it to cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerHandle {
    index: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    prev: u32,
    next: u32,
    generation: u32,
    /// Level 0..LEVELS, LOC_READY or LOC_FREE.
    loc: u8,
    slot: u8,
    value: Option<T>,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    occupied: u64,
    heads: [u32; SLOTS],
}

/// The timing wheel. `T` is the payload returned on expiry.
#[derive(Debug)]
pub struct TimerWheel<T> {
    elapsed: u64,
    levels: [Level; LEVELS],
    ready_head: u32,
    ready_tail: u32,
    entries: Vec<Entry<T>>,
    free_head: u32,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose time starts at tick `now`.
    pub fn new(now: u64) -> TimerWheel<T> {
        TimerWheel {
            elapsed: now,
            levels: [Level {
                occupied: 0,
                heads: [NIL; SLOTS],
            }; LEVELS],
            ready_head: NIL,
            ready_tail: NIL,
            entries: Vec::new(),
            free_head: NIL,
            len: 0,
        }
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wheel's current tick: the latest `now` it was polled with.
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Bytes of slab per pending timer (excluding a payload's heap data).
    pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry<T>>();

    /// Bytes the wheel holds: its slab (as allocated) and its levels.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * Self::ENTRY_BYTES + std::mem::size_of::<Self>()
    }

    /// Adds a timer; a deadline at or before the current tick expires on the next poll.
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerHandle {
        let index = if self.free_head != NIL {
            let i = self.free_head;
            let e = &mut self.entries[i as usize];
            self.free_head = e.next;
            e.deadline = deadline;
            e.value = Some(value);
            i
        } else {
            // Invariant: a wheel never holds 2^32 - 1 timers (that is > 100 GiB of slab).
            let i =
                u32::try_from(self.entries.len()).expect("timer wheel slab exceeds u32 indices");
            self.entries.push(Entry {
                deadline,
                prev: NIL,
                next: NIL,
                generation: 0,
                loc: LOC_FREE,
                slot: 0,
                value: Some(value),
            });
            i
        };
        self.place(index);
        self.len += 1;
        TimerHandle {
            index,
            generation: self.entries[index as usize].generation,
        }
    }

    /// Removes a pending timer and returns its payload; `None` if it already
    /// expired or was cancelled.
    pub fn cancel(&mut self, handle: TimerHandle) -> Option<T> {
        let e = self.entries.get(handle.index as usize)?;
        if e.generation != handle.generation || e.loc == LOC_FREE {
            return None;
        }
        self.unlink(handle.index);
        self.len -= 1;
        Some(self.release(handle.index))
    }

    /// The deadline of a pending timer.
    pub fn deadline(&self, handle: TimerHandle) -> Option<u64> {
        let e = self.entries.get(handle.index as usize)?;
        (e.generation == handle.generation && e.loc != LOC_FREE).then_some(e.deadline)
    }

    /// The earliest tick at which [`poll`](Self::poll) can make progress: no
    /// later than the earliest deadline, and earlier only when a slot must be
    /// cascaded. `None` when empty.
    pub fn next_wake(&self) -> Option<u64> {
        if self.ready_head != NIL {
            return Some(self.elapsed);
        }
        self.next_slot().map(|(_, _, when)| when)
    }

    /// The next expired timer at tick `now`, as `(deadline, payload)`.
    /// Expired timers come out in deadline order, except those inserted with
    /// a deadline already past, which come first. Moves the wheel to `now`
    /// when nothing more has expired; a `now` earlier than the wheel's time
    /// expires nothing.
    pub fn poll(&mut self, now: u64) -> Option<(u64, T)> {
        loop {
            if self.ready_head != NIL {
                let i = self.ready_head;
                self.unlink(i);
                self.len -= 1;
                let deadline = self.entries[i as usize].deadline;
                return Some((deadline, self.release(i)));
            }
            match self.next_slot() {
                Some((level, slot, when)) if when <= now => {
                    // Invariant: slots are found at or after `elapsed`.
                    debug_assert!(when >= self.elapsed);
                    self.elapsed = when;
                    let mut i = self.levels[level].heads[slot];
                    self.levels[level].heads[slot] = NIL;
                    self.levels[level].occupied &= !(1u64 << slot);
                    while i != NIL {
                        let next = self.entries[i as usize].next;
                        self.place(i);
                        i = next;
                    }
                }
                _ => {
                    if now > self.elapsed {
                        self.elapsed = now;
                    }
                    return None;
                }
            }
        }
    }

    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        for level in 0..LEVELS {
            let occupied = self.levels[level].occupied;
            if occupied == 0 {
                continue;
            }
            let shift = SLOT_BITS * level as u32;
            let slot_span = 1u64 << shift;
            let level_span = slot_span << SLOT_BITS;
            let now_slot = ((self.elapsed >> shift) & SLOT_MASK) as u32;
            // The current slot is never occupied at level 0 (due entries go to
            // ready) and holds only wrapped entries above it, so the search
            // starts at the slot after it and wraps round to it last.
            let first = (now_slot + 1) % SLOTS as u32;
            let slot = ((occupied.rotate_right(first).trailing_zeros() + first) as usize) % SLOTS;
            let level_start = self.elapsed & !(level_span - 1);
            let mut when = level_start + slot as u64 * slot_span;
            if slot as u32 <= now_slot {
                // Only the top level wraps: its far entries come round again.
                when += level_span;
            }
            return Some((level, slot, when));
        }
        None
    }

    /// Puts entry `i` (not linked anywhere) into the list its deadline calls for.
    fn place(&mut self, i: u32) {
        let deadline = self.entries[i as usize].deadline;
        if deadline <= self.elapsed {
            let tail = self.ready_tail;
            let e = &mut self.entries[i as usize];
            e.loc = LOC_READY;
            e.prev = tail;
            e.next = NIL;
            if tail == NIL {
                self.ready_head = i;
            } else {
                self.entries[tail as usize].next = i;
            }
            self.ready_tail = i;
            return;
        }
        let mut masked = (self.elapsed ^ deadline) | SLOT_MASK;
        if masked >= WHEEL_SPAN {
            masked = WHEEL_SPAN - 1;
        }
        let level = ((63 - masked.leading_zeros()) / SLOT_BITS) as usize;
        let slot = ((deadline >> (SLOT_BITS * level as u32)) & SLOT_MASK) as usize;
        let head = self.levels[level].heads[slot];
        let e = &mut self.entries[i as usize];
        e.loc = level as u8;
        e.slot = slot as u8;
        e.prev = NIL;
        e.next = head;
        if head != NIL {
            self.entries[head as usize].prev = i;
        }
        self.levels[level].heads[slot] = i;
        self.levels[level].occupied |= 1u64 << slot;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, loc, slot) = {
            let e = &self.entries[i as usize];
            (e.prev, e.next, e.loc, e.slot as usize)
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        if loc == LOC_READY {
            if prev == NIL {
                self.ready_head = next;
            }
            if next == NIL {
                self.ready_tail = prev;
            }
        } else {
            let level = &mut self.levels[loc as usize];
            if prev == NIL {
                level.heads[slot] = next;
                if next == NIL {
                    level.occupied &= !(1u64 << slot);
                }
            }
        }
        let e = &mut self.entries[i as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn release(&mut self, i: u32) -> T {
        let e = &mut self.entries[i as usize];
        e.loc = LOC_FREE;
        e.generation = e.generation.wrapping_add(1);
        e.next = self.free_head;
        self.free_head = i;
        // Invariant: a linked (non-free) entry always holds its value.
        e.value.take().expect("live timer entry holds its value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashSet};

    fn drain(w: &mut TimerWheel<u32>, now: u64) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while let Some(x) = w.poll(now) {
            assert!(x.0 <= now, "expired {x:?} before its deadline at {now}");
            out.push(x);
        }
        out
    }

    #[test]
    fn every_level_boundary_plus_minus_one_fires_exactly_on_time() {
        for start in [0u64, 1, 63, 64, 4095, 1_000_003, (1 << 36) - 1] {
            for level in 0..=LEVELS as u32 {
                let span = 1u64 << (SLOT_BITS * level);
                for d in [span.saturating_sub(1).max(1), span, span + 1] {
                    let mut w = TimerWheel::new(start);
                    let deadline = start + d;
                    let h = w.insert(deadline, 7);
                    assert_eq!(w.deadline(h), Some(deadline));
                    assert!(w.next_wake().expect("one pending") <= deadline);
                    // Poll through every wake before the deadline: nothing fires.
                    while let Some(wake) = w.next_wake() {
                        if wake >= deadline {
                            break;
                        }
                        assert_eq!(w.poll(wake), None, "start {start} delta {d}");
                    }
                    assert_eq!(w.poll(deadline - 1), None, "start {start} delta {d}");
                    assert_eq!(
                        w.poll(deadline),
                        Some((deadline, 7)),
                        "start {start} delta {d}"
                    );
                    assert!(w.is_empty());
                }
            }
        }
    }

    #[test]
    fn past_deadlines_expire_on_next_poll() {
        let mut w = TimerWheel::new(1000);
        w.insert(10, 1);
        w.insert(1000, 2);
        assert_eq!(w.next_wake(), Some(1000));
        assert_eq!(drain(&mut w, 1000), vec![(10, 1), (1000, 2)]);
    }

    #[test]
    fn stale_handles_cancel_nothing() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(5, 1);
        assert_eq!(w.cancel(a), Some(1));
        let b = w.insert(6, 2); // reuses a's slab slot
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.cancel(b), Some(2));
        assert!(w.is_empty());
    }

    #[test]
    fn years_ahead_is_exact() {
        let mut w = TimerWheel::new(0);
        let ten_years = 10 * 365 * 86_400_000u64;
        w.insert(ten_years, 1);
        w.insert(ten_years + 1, 2);
        let mut wakes = 0;
        while let Some(wake) = w.next_wake() {
            if wake >= ten_years {
                break;
            }
            assert_eq!(w.poll(wake), None);
            wakes += 1;
        }
        assert!(wakes < 1000, "cascading a far timer took {wakes} wakes");
        assert_eq!(drain(&mut w, ten_years), vec![(ten_years, 1)]);
        assert_eq!(drain(&mut w, ten_years + 1), vec![(ten_years + 1, 2)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Cancel(usize),
        Advance(u64),
    }

    fn delta() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..70, 0u64..5_000, 0u64..1 << 24, 0u64..1 << 40]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => delta().prop_map(Op::Insert),
            2 => any::<usize>().prop_map(Op::Cancel),
            3 => delta().prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The wheel expires exactly what a BinaryHeap model expires, at the
        /// same times, over random insert / cancel / advance sequences.
        #[test]
        fn matches_binary_heap_model(start in 0u64..1 << 40, ops in proptest::collection::vec(op(), 1..200)) {
            let mut w = TimerWheel::new(start);
            let mut model: BinaryHeap<Reverse<(u64, u32)>> = BinaryHeap::new();
            let mut cancelled: HashSet<u32> = HashSet::new();
            let mut live: Vec<(TimerHandle, u32, u64)> = Vec::new();
            let mut now = start;
            let mut next_id = 0u32;
            for op in ops {
                match op {
                    Op::Insert(d) => {
                        // Deadlines may lie in the past too.
                        let deadline = (now + d).saturating_sub(30);
                        let h = w.insert(deadline, next_id);
                        model.push(Reverse((deadline, next_id)));
                        live.push((h, next_id, deadline));
                        next_id += 1;
                    }
                    Op::Cancel(i) if !live.is_empty() => {
                        let (h, id, _) = live.swap_remove(i % live.len());
                        prop_assert_eq!(w.cancel(h), Some(id));
                        cancelled.insert(id);
                    }
                    Op::Cancel(_) => {}
                    Op::Advance(d) => {
                        now += d;
                        if let (Some(wake), Some(Reverse((min, _)))) = (w.next_wake(), model.iter().filter(|r| !cancelled.contains(&r.0 .1)).min().copied()) {
                            prop_assert!(wake <= min.max(w.elapsed()));
                        }
                        let mut got = drain(&mut w, now);
                        got.sort_unstable();
                        let mut want = Vec::new();
                        while let Some(Reverse((dl, id))) = model.peek().copied() {
                            if dl > now { break; }
                            model.pop();
                            if !cancelled.remove(&id) { want.push((dl, id)); }
                        }
                        want.sort_unstable();
                        live.retain(|(_, id, _)| !want.iter().any(|(_, w)| w == id));
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(w.len(), live.len());
            }
        }
    }
}
