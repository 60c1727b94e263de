//! The timer wheel beside BinaryHeap, tokio-util's DelayQueue and tokio's timers.

use super::*;

pub fn wheel(quick: bool) -> Table {
    let sizes: &[usize] = if quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 1_000_000, 10_000_000]
    };
    let rounds = if quick { 3 } else { 5 };
    let ops = 100_000u64;
    let span = 12 * 86_400_000u64;
    let mut rows = Vec::new();
    let mut notes = vec![format!(
        "{ops} operations per round, {rounds} rounds, timers spread over 12 days, with N already pending, after one \
         untimed churn of {ops} inserts and cancels (so the slab does not grow while timed). \
         BinaryHeap cancels lazily (a tombstone set); DelayQueue is tokio-util's (insert and remove only: its expiry runs on tokio's own timer), measured up to N = {}.",
        if cfg!(debug_assertions) { "10,000 (an unoptimized build)" } else { "1M" }
    )];
    let mut inserts_all = Vec::new();
    for &n in sizes {
        let (mut ins, mut can, mut exp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut h_ins, mut h_can, mut h_exp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut d_ins, mut d_can) = (Vec::new(), Vec::new());
        let mut bytes_per = 0.0f64;
        for round in 0..rounds {
            // Sundial's wheel.
            let mut w: TimerWheel<u64> = TimerWheel::new(0);
            for i in 0..n as u64 {
                w.insert(1 + spread(i, span), i);
            }
            if round == 0 {
                bytes_per = w.memory_bytes() as f64 / n as f64;
            }
            let base = (round as u64 + 1) * 1_000_000_000;
            // Steady state, as in a running agent: the slab has room (a first
            // churn grows it), so the timed part measures the wheel, not Vec growth.
            let warm: Vec<_> = (0..ops)
                .map(|i| w.insert(1 + spread(base / 2 + i, span), i))
                .collect();
            for h in warm {
                w.cancel(h);
            }
            let t = Instant::now();
            let hs: Vec<_> = (0..ops)
                .map(|i| w.insert(1 + spread(base + i, span), i))
                .collect();
            ins.push(t.elapsed().as_nanos() as f64 / ops as f64);
            let t = Instant::now();
            for h in hs {
                black_box(w.cancel(h));
            }
            can.push(t.elapsed().as_nanos() as f64 / ops as f64);
            // Expire: advance through the first `ops` deadlines' worth of time.
            let horizon = span * ops / n as u64;
            let t = Instant::now();
            let mut expired = 0u64;
            // As a driver does: sleep to the next wake, then take what is due.
            while let Some(wake) = w.next_wake() {
                if wake > horizon {
                    break;
                }
                while let Some(x) = w.poll(wake) {
                    black_box(x);
                    expired += 1;
                }
            }
            exp.push(t.elapsed().as_nanos() as f64 / expired.max(1) as f64);
            drop(w);

            // BinaryHeap with lazy cancel.
            let mut heap: BinaryHeap<std::cmp::Reverse<(u64, u64)>> = BinaryHeap::with_capacity(n);
            for i in 0..n as u64 {
                heap.push(std::cmp::Reverse((1 + spread(i, span), i)));
            }
            let mut dead: HashSet<u64> = HashSet::new();
            let t = Instant::now();
            for i in 0..ops {
                heap.push(std::cmp::Reverse((
                    1 + spread(base + i, span),
                    n as u64 + i,
                )));
            }
            h_ins.push(t.elapsed().as_nanos() as f64 / ops as f64);
            let t = Instant::now();
            for i in 0..ops {
                dead.insert(n as u64 + i);
            }
            h_can.push(t.elapsed().as_nanos() as f64 / ops as f64);
            let t = Instant::now();
            let mut expired = 0u64;
            while let Some(std::cmp::Reverse((d, id))) = heap.peek().copied() {
                if d > horizon {
                    break;
                }
                heap.pop();
                if !dead.remove(&id) {
                    expired += 1;
                }
            }
            h_exp.push(t.elapsed().as_nanos() as f64 / expired.max(1) as f64);
            drop(heap);

            // tokio-util DelayQueue (capped at 1M pending: it is slow to fill
            // beyond; and at 10,000 in an unoptimized build, whose debug
            // assertions make each of its cancels walk the queue).
            if n <= 1_000_000 && (!cfg!(debug_assertions) || n <= 10_000) {
                let (di, dc) = delay_queue(n, ops as usize, span);
                d_ins.push(di);
                d_can.push(dc);
            }
        }
        let (im, _, _) = stats(&ins);
        let (cm, _, _) = stats(&can);
        inserts_all.push(im);
        let dq = |v: &Vec<f64>| {
            if v.is_empty() {
                "—".to_string()
            } else {
                fmt3(v, "ns")
            }
        };
        let ratio = |ours: f64, v: &Vec<f64>| {
            if v.is_empty() {
                String::new()
            } else {
                format!(" ({:.1}× ours)", stats(v).0 / ours)
            }
        };
        rows.push(Row {
            metric: format!("insert, N = {n}"),
            value: fmt3(&ins, "ns"),
            baselines: format!(
                "BinaryHeap {}; DelayQueue {}{}",
                fmt3(&h_ins, "ns"),
                dq(&d_ins),
                ratio(im, &d_ins)
            ),
            target: "≤ 40 ns; ≥ 5× DelayQueue".into(),
            verdict: met(im <= 40.0 && (d_ins.is_empty() || stats(&d_ins).0 >= 5.0 * im)),
        });
        rows.push(Row {
            metric: format!("cancel, N = {n}"),
            value: fmt3(&can, "ns"),
            baselines: format!(
                "BinaryHeap (lazy) {}; DelayQueue {}{}",
                fmt3(&h_can, "ns"),
                dq(&d_can),
                ratio(cm, &d_can)
            ),
            target: "≤ 25 ns; ≥ 5× DelayQueue".into(),
            verdict: met(cm <= 25.0 && (d_can.is_empty() || stats(&d_can).0 >= 5.0 * cm)),
        });
        rows.push(Row {
            metric: format!("expire, N = {n}"),
            value: fmt3(&exp, "ns"),
            baselines: format!("BinaryHeap {}", fmt3(&h_exp, "ns")),
            target: "—".into(),
            verdict: "—".into(),
        });
        rows.push(Row {
            metric: format!("bytes per pending timer, N = {n}"),
            value: format!(
                "{bytes_per:.1} B (slab entry {} B, as allocated)",
                TimerWheel::<u64>::ENTRY_BYTES
            ),
            baselines: "—".into(),
            target: "—".into(),
            verdict: "—".into(),
        });
    }
    let (lo, hi) = (
        inserts_all.iter().copied().fold(f64::INFINITY, f64::min),
        inserts_all.iter().copied().fold(0.0, f64::max),
    );
    notes.push(format!("Insert cost from the smallest to the largest N: {lo:.1}–{hi:.1} ns (flat means the ratio stays near 1: {:.2}).", hi / lo.max(0.001)));
    Table {
        suite: "wheel",
        notes,
        rows,
    }
}

pub(super) fn delay_queue(n: usize, ops: usize, span: u64) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build();
    let Ok(rt) = rt else { return (0.0, 0.0) };
    rt.block_on(async move {
        let mut q: tokio_util::time::DelayQueue<u64> =
            tokio_util::time::DelayQueue::with_capacity(n + ops);
        let start = tokio::time::Instant::now();
        for i in 0..n as u64 {
            q.insert_at(i, start + Duration::from_millis(1 + spread(i, span)));
        }
        let t = Instant::now();
        let keys: Vec<_> = (0..ops as u64)
            .map(|i| {
                q.insert_at(
                    i,
                    start + Duration::from_millis(1 + spread(7_000_000_000 + i, span)),
                )
            })
            .collect();
        let ins = t.elapsed().as_nanos() as f64 / ops as f64;
        let t = Instant::now();
        for k in keys {
            black_box(q.remove(&k));
        }
        let can = t.elapsed().as_nanos() as f64 / ops as f64;
        (ins, can)
    })
}
