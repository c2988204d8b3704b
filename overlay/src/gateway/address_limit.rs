//! A token bucket per source address for the handshake messages the
//! gateway takes while under load, each with a valid cookie (`mac2`).
//! boringtun has none; the kernel's WireGuard keeps one, and like it the
//! gateway consults it only for messages that carry a valid cookie under
//! load (the kernel's `wg_cookie_validate_packet`). The load is decided
//! differently: the kernel is under load while its queue of handshakes is
//! long, the gateway while it has taken more than
//! [`HANDSHAKES_PER_S_MAX`](super::HANDSHAKES_PER_S_MAX) in a second.
//!
//! The cookie proves that a sender receives at its address; it does not
//! limit what that sender asks for. Without this, one host that answers
//! cookies could have the gateway do a DH for every initiation it sends
//! once it is under load. With it, an address gets
//! [`ADDRESS_HANDSHAKES_BURST`] messages at once and
//! [`ADDRESS_HANDSHAKES_PER_S`] a second after that. IPv6 senders are
//! limited per /64, which is what one host can pick its addresses from.
//!
//! Only messages with a valid cookie come here because only they prove
//! their source address: a bucket charged for messages without one could
//! be drained by anyone who spoofs that address, cutting a peer gateway
//! (or every site behind one NAT address) off its handshakes. Not under
//! load, no address is limited at all.
//!
//! The table is bounded ([`ADDRESSES_MAX`]): an address whose bucket is full
//! again is forgotten (it would start full anyway), and a new address that
//! finds the table full is refused. Since every message here carries a
//! cookie for its source address, spoofed sources cannot fill it. An
//! address that spent `n` messages' worth of its bucket is full again
//! `n` times [`COST_MS`] after its last message (50 to 250 ms), and is
//! forgotten at the first [`AddressLimiter::expire`] at or after that (the
//! gateway calls it every timer tick, 100 ms). A new address costs one
//! table entry (an allocation): handshake messages come here, data never.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::IpAddr;

/// Handshake messages one address may send a second, after its burst.
pub const ADDRESS_HANDSHAKES_PER_S: i64 = 20;
/// Handshake messages one address may send at once.
pub const ADDRESS_HANDSHAKES_BURST: i64 = 5;
/// Addresses (IPv4) or /64 prefixes (IPv6) tracked at once, at most.
pub const ADDRESSES_MAX: usize = 4096;

/// What one message costs, in ms of refill.
pub(super) const COST_MS: i64 = 1000 / ADDRESS_HANDSHAKES_PER_S;
/// A full bucket, in ms of refill.
const FULL_MS: i64 = COST_MS * ADDRESS_HANDSHAKES_BURST;

const _: () = assert!(COST_MS * ADDRESS_HANDSHAKES_PER_S == 1000);
const _: () = assert!(ADDRESS_HANDSHAKES_BURST >= 1);

/// Buckets by source address.
#[derive(Debug, Default)]
pub(crate) struct AddressLimiter {
    buckets: BTreeMap<[u8; 16], Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Refill held, ms (a message costs [`COST_MS`]).
    tokens_ms: i64,
    /// When `tokens_ms` was last brought up to date.
    at_ms: i64,
}

impl Bucket {
    /// The bucket brought up to `now_ms` (time never runs back).
    fn at(self, now_ms: i64) -> Bucket {
        let elapsed_ms = now_ms.saturating_sub(self.at_ms).max(0);
        Bucket {
            tokens_ms: self.tokens_ms.saturating_add(elapsed_ms).min(FULL_MS),
            at_ms: self.at_ms.max(now_ms),
        }
    }
}

impl AddressLimiter {
    /// Whether a handshake message from `addr` may go on; takes its cost
    /// from the address's bucket if so.
    pub(crate) fn allow(&mut self, now_ms: i64, addr: IpAddr) -> bool {
        let tracked = self.buckets.len();
        let bucket = match self.buckets.entry(key(addr)) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if tracked >= ADDRESSES_MAX => return false,
            Entry::Vacant(entry) => entry.insert(Bucket {
                tokens_ms: FULL_MS,
                at_ms: now_ms,
            }),
        };
        *bucket = bucket.at(now_ms);
        if bucket.tokens_ms < COST_MS {
            return false;
        }
        bucket.tokens_ms -= COST_MS;
        true
    }

    /// Forgets the addresses whose buckets have filled up again.
    pub(crate) fn expire(&mut self, now_ms: i64) {
        self.buckets
            .retain(|_, bucket| bucket.at(now_ms).tokens_ms < FULL_MS);
    }

    /// Addresses tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// The bucket's key: an IPv4 address, or an IPv6 /64 prefix.
fn key(addr: IpAddr) -> [u8; 16] {
    let mut key = [0u8; 16];
    match addr.to_canonical() {
        IpAddr::V4(v4) => key[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => {
            key[..8].copy_from_slice(&v6.octets()[..8]);
            // Apart from every IPv4 key, whose bytes 4..16 are zero.
            key[15] = 1;
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    /// How many of `count` messages from `addr` at `now_ms` go on.
    fn allowed(limiter: &mut AddressLimiter, now_ms: i64, addr: IpAddr, count: usize) -> usize {
        (0..count).filter(|_| limiter.allow(now_ms, addr)).count()
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate() {
        let mut limiter = AddressLimiter::default();
        let burst = usize::try_from(ADDRESS_HANDSHAKES_BURST).unwrap();
        assert_eq!(allowed(&mut limiter, 0, v4(1), 100), burst);
        // Another address is not held back by the first.
        assert_eq!(allowed(&mut limiter, 0, v4(2), 100), burst);
        // One message's worth of time brings one message.
        assert_eq!(allowed(&mut limiter, COST_MS, v4(1), 100), 1);
        // Over ten seconds of sending, the rate.
        let mut total = 0;
        for now_ms in (COST_MS + 1..=COST_MS + 10_000).step_by(10) {
            total += allowed(&mut limiter, now_ms, v4(1), 1);
        }
        let rate = usize::try_from(ADDRESS_HANDSHAKES_PER_S * 10).unwrap();
        assert!((rate - 1..=rate).contains(&total), "{total}");
        // A clock that runs back gives nothing extra.
        assert_eq!(allowed(&mut limiter, 0, v4(1), 100), 0);
    }

    #[test]
    fn ipv6_senders_share_a_bucket_per_64_and_ipv4_mapped_ones_are_ipv4() {
        let mut limiter = AddressLimiter::default();
        let burst = usize::try_from(ADDRESS_HANDSHAKES_BURST).unwrap();
        let host = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        let mut total = 0;
        for last in 1..=100 {
            total += allowed(&mut limiter, 0, host(last), 1);
        }
        assert_eq!(total, burst, "one /64, one bucket");
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert_eq!(allowed(&mut limiter, 0, other, 100), burst);
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 7).to_ipv6_mapped());
        assert_eq!(allowed(&mut limiter, 0, mapped, 100), burst);
        assert_eq!(allowed(&mut limiter, 0, v4(7), 100), 0, "the same sender");
    }

    #[test]
    fn the_table_is_bounded_and_forgets_addresses_whose_buckets_refilled() {
        let mut limiter = AddressLimiter::default();
        for i in 0..ADDRESSES_MAX {
            let addr = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + u32::try_from(i).unwrap()));
            assert!(limiter.allow(0, addr));
        }
        assert_eq!(limiter.len(), ADDRESSES_MAX);
        assert!(!limiter.allow(0, IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))));
        // Not yet full again: kept.
        limiter.expire(COST_MS - 1);
        assert_eq!(limiter.len(), ADDRESSES_MAX);
        limiter.expire(COST_MS);
        assert_eq!(limiter.len(), 0);
        assert!(limiter.allow(COST_MS, IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))));
    }
}
