//! Admission of new connections: the handshake budget, fair per address.
//!
//! Handshakes are the costly part of a reconnect storm, so the coordinator
//! accepts at most `rate` a second and refuses the rest before any
//! cryptography. One global bucket alone lets a single flooding address take
//! every token as it refills, so the devices behind other addresses never
//! get in. The rule here: while only one address is knocking it may use the
//! whole budget (a fleet behind one NAT, a test on loopback); while several
//! are, each may take at most `rate / n` a second, so a flood from one
//! address leaves the rest of the budget to the others.
//!
//! IPv6 addresses count by their /64 prefix (one host is given a whole /64),
//! and at most [`ADDRESSES_TRACKED_MAX`] are tracked at once; addresses beyond
//! share one entry, so a spread of spoofed sources cannot grow the map.

use std::collections::HashMap;
use std::net::IpAddr;

/// Addresses tracked at once; the rest share one entry.
pub const ADDRESSES_TRACKED_MAX: usize = 4_096;
/// An address that has not knocked for this long no longer counts as
/// knocking, ms.
pub const ADDRESS_IDLE_MS: u64 = 2_000;
/// How often idle addresses are forgotten, ms.
const PRUNE_EVERY_MS: u64 = 500;

/// What the budget says of one new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The coordinator's budget is spent for now.
    OverBudget,
    /// This address has taken its share while others are knocking.
    OverShare,
}

/// The key an address counts under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum AddrKey {
    V4(u32),
    V6Prefix(u64),
    Overflow,
}

impl AddrKey {
    fn of(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(u32::from(v4)),
                None => AddrKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Share {
    level: f64,
    at_ms: u64,
    last_ms: u64,
}

/// The handshake budget: `rate` a second over all addresses, at most a tenth
/// of a second's worth at once, fair per address (see the module docs).
#[derive(Debug)]
pub struct HandshakeBudget {
    rate: f64,
    level: f64,
    at_ms: u64,
    addresses: HashMap<AddrKey, Share>,
    pruned_ms: u64,
}

impl HandshakeBudget {
    /// A budget that starts with its burst (a coordinator just started
    /// admits its first connections at once).
    pub fn new(rate_per_sec: u32, now_ms: u64) -> HandshakeBudget {
        let rate = f64::from(rate_per_sec.max(1));
        HandshakeBudget {
            rate,
            level: Self::burst(rate),
            at_ms: now_ms,
            addresses: HashMap::new(),
            pruned_ms: now_ms,
        }
    }

    fn burst(rate: f64) -> f64 {
        (rate / 10.0).max(1.0)
    }

    /// Addresses knocking now (within [`ADDRESS_IDLE_MS`]).
    pub fn knocking(&self) -> usize {
        self.addresses.len()
    }

    /// Decides one new connection from `ip` at `now_ms` (monotonic).
    pub fn take(&mut self, now_ms: u64, ip: IpAddr) -> Admit {
        let now_ms = now_ms.max(self.at_ms);
        let elapsed = (now_ms - self.at_ms) as f64 / 1000.0;
        self.level = (self.level + elapsed * self.rate).min(Self::burst(self.rate));
        self.at_ms = now_ms;

        if now_ms.saturating_sub(self.pruned_ms) >= PRUNE_EVERY_MS {
            self.addresses
                .retain(|_, s| now_ms.saturating_sub(s.last_ms) < ADDRESS_IDLE_MS);
            self.pruned_ms = now_ms;
        }
        let mut key = AddrKey::of(ip);
        if !self.addresses.contains_key(&key) && self.addresses.len() >= ADDRESSES_TRACKED_MAX - 1 {
            key = AddrKey::Overflow;
        }
        let knocking = self.addresses.len() + usize::from(!self.addresses.contains_key(&key));
        let share_rate = self.rate / knocking as f64;
        let share_burst = Self::burst(share_rate);
        let share = self.addresses.entry(key).or_insert(Share {
            level: share_burst,
            at_ms: now_ms,
            last_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(share.at_ms) as f64 / 1000.0;
        share.level = (share.level + elapsed * share_rate).min(share_burst);
        share.at_ms = now_ms;
        share.last_ms = now_ms;

        if knocking > 1 && share.level < 1.0 {
            return Admit::OverShare;
        }
        if self.level < 1.0 {
            return Admit::OverBudget;
        }
        self.level -= 1.0;
        share.level = (share.level - 1.0).max(0.0);
        Admit::Yes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn one_address_alone_may_use_the_whole_budget() {
        let mut b = HandshakeBudget::new(500, 0);
        let mut admitted = 0;
        // 5,000 attempts a second for 10 s.
        for i in 0..50_000u64 {
            if b.take(i / 5, v4(1)) == Admit::Yes {
                admitted += 1;
            }
        }
        // 10 s at 500/s, plus at most one burst.
        assert!((4_900..=5_050).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_flooding_address_leaves_the_budget_to_the_others() {
        let mut b = HandshakeBudget::new(500, 0);
        let (mut flood, mut honest, mut honest_tries) = (0u32, 0u32, 0u32);
        // The flood: 20 attempts a ms (40x the budget); three honest devices
        // on other addresses try once every 100 ms each.
        for ms in 0..10_000u64 {
            for _ in 0..20 {
                if b.take(ms, v4(66)) == Admit::Yes {
                    flood += 1;
                }
            }
            if ms % 100 == 7 {
                for d in 1..=3 {
                    honest_tries += 1;
                    if b.take(ms, v4(d)) == Admit::Yes {
                        honest += 1;
                    }
                }
            }
        }
        // Every honest attempt but the first few (before they count as
        // knocking) gets in; the flood gets at most its share and the total
        // stays within the budget.
        assert!(honest + 6 >= honest_tries, "{honest} of {honest_tries}");
        assert!(flood <= 10 * 500 / 4 + 200, "{flood}");
        assert!(flood + honest <= 10 * 500 + 50, "{}", flood + honest);
    }

    #[test]
    fn ipv6_counts_by_prefix_and_spoofed_spreads_share_one_entry() {
        let mut b = HandshakeBudget::new(100_000, 0);
        for i in 0..1_000u128 {
            let ip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | i));
            b.take(0, ip);
        }
        assert_eq!(b.knocking(), 1);
        for i in 0..10_000u32 {
            b.take(1, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert_eq!(b.knocking(), ADDRESSES_TRACKED_MAX);
        // Idle addresses are forgotten.
        b.take(ADDRESS_IDLE_MS + 10, v4(1));
        assert_eq!(b.knocking(), 1);
    }
}
