//! Engine tests with toy sites: virtual time only, no sleeps.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use super::*;

const T0: i64 = 1_700_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    id: u64,
    len: usize,
}

impl Payload for Msg {
    fn wire_len(&self) -> usize {
        self.len
    }
    fn kind(&self) -> &'static str {
        "toy"
    }
    fn fingerprint(&self) -> u64 {
        mix64(self.id)
    }
}

/// Inputs: send `count` messages of `len` bytes to `to`, or arm a timer.
#[derive(Debug)]
enum Input {
    Send { to: SiteId, count: u64, len: usize },
    TimerAt(i64),
}

#[derive(Debug, Default)]
struct Toy {
    /// (true time, local time, from, id) of every delivery.
    received: Vec<(i64, i64, SiteId, u64)>,
    starts: u32,
    crashes: u32,
    timer: Option<i64>,
    fired: Vec<i64>,
    /// Echo every message back to its sender once.
    echo: bool,
}

impl Site for Toy {
    type Msg = Msg;
    type Input = Input;

    fn start(&mut self, _ctx: &mut Ctx<'_, Msg>) {
        self.starts += 1;
    }

    fn handle_message(&mut self, ctx: &mut Ctx<'_, Msg>, from: SiteId, msg: Msg) {
        self.received
            .push((ctx.true_ms(), ctx.now_ms(), from, msg.id));
        if self.echo && msg.id < 1_000_000 {
            ctx.send(
                from,
                Msg {
                    id: msg.id + 1_000_000,
                    len: msg.len,
                },
            );
        }
    }

    fn handle_timeout(&mut self, ctx: &mut Ctx<'_, Msg>) {
        if self.timer.is_some_and(|at| at <= ctx.now_ms()) {
            self.fired.push(ctx.now_ms());
            self.timer = None;
        }
    }

    fn handle_input(&mut self, ctx: &mut Ctx<'_, Msg>, input: Input) {
        match input {
            Input::Send { to, count, len } => {
                for id in 0..count {
                    ctx.send(to, Msg { id, len });
                }
            }
            Input::TimerAt(at) => self.timer = Some(at),
        }
    }

    fn crash(&mut self) {
        self.crashes += 1;
        self.timer = None;
    }

    fn poll_timeout(&self) -> Option<i64> {
        self.timer
    }
}

fn sim(config: SimConfig) -> Sim<Toy> {
    let sites = (0..config.sites).map(|_| Toy::default()).collect();
    Sim::new(config, sites)
}

fn chatty(seed: u64, faults: Faults) -> Sim<Toy> {
    let mut config = SimConfig::new(seed, 8, T0);
    config.faults = faults;
    let mut sim = sim(config);
    for site in 0..8 {
        sim.site_mut(site).echo = true;
    }
    for round in 0..50 {
        for site in 0..8 {
            let to = (site + 1 + round % 7) % 8;
            let input = Input::Send {
                to,
                count: 3,
                len: 100,
            };
            sim.schedule_input(T0 + round as i64 * 1_000, site, "send", input);
        }
    }
    sim
}

fn all_faults() -> Faults {
    Faults {
        loss: 0.05,
        duplicate: 0.05,
        reorder: 0.1,
        reorder_delay_max_ms: 500,
        partitions: Some(PartitionFaults {
            every_ms: 5_000,
            length_min_ms: 1_000,
            length_max_ms: 5_000,
            kinds: vec![
                PartitionKind::Halves,
                PartitionKind::Isolate,
                PartitionKind::Asymmetric,
            ],
        }),
        crashes: Some(CrashFaults {
            every_ms: 4_000,
            down_min_ms: 500,
            down_max_ms: 3_000,
            down_max: 2,
        }),
        skew: Some(SkewFaults {
            offset_max_ms: 5_000,
            drift_max_ppm: 200,
        }),
        uplink_bytes_per_s: Some(1_000_000),
        stop_after_ms: Some(40_000),
    }
}

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
    let run = |seed| {
        let mut sim = chatty(seed, all_faults());
        sim.run_until(T0 + 60_000);
        (sim.trace().hash(), sim.trace().len(), sim.stats().clone())
    };
    let (hash, len, stats) = run(7);
    assert_eq!(run(7), (hash, len, stats.clone()));
    assert_ne!(run(8).0, hash);
    // Every fault actually happened in this run.
    assert!(stats.lost > 0 && stats.duplicated > 0 && stats.reordered > 0);
    assert!(stats.partitioned > 0 && stats.crashes > 0 && stats.partitions > 0);
}

#[test]
fn without_faults_every_message_arrives_within_the_latency_bounds() {
    let mut sim = chatty(1, Faults::default());
    sim.run_until(T0 + 60_000);
    let net = NetConfig::default();
    let mut delivered = 0;
    for site in 0..8 {
        for &(true_ms, local_ms, _, id) in &sim.sites()[site].received {
            assert_eq!(true_ms, local_ms, "no skew configured");
            if id < 1_000_000 {
                // Sent at a whole second by the input.
                let latency = true_ms % 1_000;
                assert!(latency >= net.latency_min_ms, "{latency}");
                assert!(latency <= net.latency_max_ms + net.jitter_ms, "{latency}");
            }
            delivered += 1;
        }
    }
    // 50 rounds × 8 sites × 3 messages, each echoed once.
    assert_eq!(delivered, 50 * 8 * 3 * 2);
    assert_eq!(sim.stats().lost + sim.stats().partitioned, 0);
}

#[test]
fn loss_and_duplication_follow_their_rates() {
    let faults = Faults {
        loss: 0.2,
        duplicate: 0.1,
        ..Faults::default()
    };
    let mut config = SimConfig::new(3, 2, T0);
    config.faults = faults;
    let mut sim = sim(config);
    let input = Input::Send {
        to: 1,
        count: 10_000,
        len: 10,
    };
    sim.schedule_input(T0, 0, "send", input);
    sim.run_until(T0 + 10_000);
    let stats = sim.stats();
    assert!((1_800..2_200).contains(&stats.lost), "{}", stats.lost);
    assert!(
        (700..900).contains(&stats.duplicated),
        "{}",
        stats.duplicated
    );
    let received = sim.sites()[1].received.len() as u64;
    assert_eq!(received, 10_000 - stats.lost + stats.duplicated);
}

#[test]
fn an_isolated_site_hears_nothing_until_the_partition_heals() {
    let mut config = SimConfig::new(11, 4, T0);
    config.faults.partitions = Some(PartitionFaults {
        every_ms: 1,
        length_min_ms: 10_000,
        length_max_ms: 10_000,
        kinds: vec![PartitionKind::Isolate],
    });
    config.faults.stop_after_ms = Some(10_000);
    let mut sim = sim(config);
    // The partition starts within the first ms; find the isolated site.
    sim.run_until(T0 + 100);
    let isolated = (0..4)
        .find(|&s| !sim.can_reach((s + 1) % 4, s))
        .expect("one site is isolated");
    let other = (isolated + 1) % 4;
    assert!(!sim.can_reach(isolated, other));
    let send = |count| Input::Send {
        to: isolated,
        count,
        len: 10,
    };
    sim.schedule_input(T0 + 1_000, other, "send", send(5));
    sim.run_until(T0 + 9_000);
    assert!(sim.sites()[isolated].received.is_empty());
    assert_eq!(sim.stats().partitioned, 5);
    // After the calm at 10 s the site is reachable again.
    sim.schedule_input(T0 + 11_000, other, "send", send(5));
    sim.run_until(T0 + 12_000);
    assert!(sim.can_reach(other, isolated));
    assert_eq!(sim.sites()[isolated].received.len(), 5);
    assert_eq!(sim.calm_at_ms(), Some(T0 + 10_000));
}

#[test]
fn asymmetric_partitions_block_one_direction_only() {
    let mut config = SimConfig::new(5, 10, T0);
    config.faults.partitions = Some(PartitionFaults {
        every_ms: 1,
        length_min_ms: 60_000,
        length_max_ms: 60_000,
        kinds: vec![PartitionKind::Asymmetric],
    });
    let mut sim = sim(config);
    sim.run_until(T0 + 100);
    let mut one_way = 0;
    for a in 0..10 {
        for b in 0..10 {
            if !sim.can_reach(a, b) {
                assert!(sim.can_reach(b, a), "{a}→{b} and back both blocked");
                one_way += 1;
            }
        }
    }
    assert_eq!(one_way, 25, "5 × 5 links blocked one way");
}

#[test]
fn a_crashed_site_loses_messages_and_restarts_with_a_new_incarnation() {
    let mut config = SimConfig::new(2, 3, T0);
    config.faults.crashes = Some(CrashFaults {
        every_ms: 1,
        down_min_ms: 5_000,
        down_max_ms: 5_000,
        down_max: 1,
    });
    config.faults.stop_after_ms = Some(20_000);
    let mut sim = sim(config);
    sim.run_until(T0 + 50);
    let crashed = (0..3).find(|&s| !sim.is_up(s)).expect("one site crashed");
    assert_eq!(sim.sites()[crashed].crashes, 1);
    // Only one site may be down at once.
    assert_eq!((0..3).filter(|&s| !sim.is_up(s)).count(), 1);
    let other = (crashed + 1) % 3;
    let input = Input::Send {
        to: crashed,
        count: 4,
        len: 10,
    };
    sim.schedule_input(T0 + 100, other, "send", input);
    sim.run_until(T0 + 1_000);
    assert!(sim.sites()[crashed].received.is_empty());
    assert_eq!(sim.stats().dest_down, 4);
    sim.run_until(T0 + 30_000);
    assert!((0..3).all(|s| sim.is_up(s)), "the calm restarts everyone");
    assert!(sim.sites()[crashed].starts >= 2);
}

#[test]
fn messages_in_flight_to_a_restarted_site_are_dropped() {
    let mut config = SimConfig::new(2, 2, T0);
    config.net.latency_min_ms = 1_000;
    config.net.latency_max_ms = 1_000;
    config.faults.crashes = Some(CrashFaults {
        every_ms: 1,
        down_min_ms: 10,
        down_max_ms: 10,
        down_max: 1,
    });
    // One crash in the first ms; the calm at 5 ms restarts the site.
    config.faults.stop_after_ms = Some(5);
    let mut sim = sim(config);
    sim.run_until(T0);
    for site in 0..2 {
        let input = Input::Send {
            to: 1 - site,
            count: 1,
            len: 10,
        };
        sim.schedule_input(T0, site, "send", input);
    }
    sim.run_until(T0 + 5_000);
    // Both messages left before the crash; the crashed site restarted before
    // its message arrived, so only the other site got one.
    let received: usize = sim.sites().iter().map(|s| s.received.len()).sum();
    assert_eq!(received, 1);
}

#[test]
fn timers_fire_on_the_sites_own_skewed_clock() {
    let mut config = SimConfig::new(9, 5, T0);
    config.faults.skew = Some(SkewFaults {
        offset_max_ms: 30_000,
        drift_max_ppm: 5_000,
    });
    let mut sim = sim(config);
    for site in 0..5 {
        sim.schedule_input(T0, site, "timer", Input::TimerAt(T0 + 60_000));
    }
    sim.run_until(T0 + 200_000);
    let mut offsets = std::collections::BTreeSet::new();
    for site in 0..5 {
        let fired = &sim.sites()[site].fired;
        assert_eq!(fired.len(), 1, "site {site}");
        // Fired at the first instant the site's clock reads the deadline.
        assert!(
            fired[0] >= T0 + 60_000 && fired[0] <= T0 + 60_002,
            "{}",
            fired[0]
        );
        offsets.insert(sim.clock(site).offset_ms);
    }
    assert!(offsets.len() > 1, "sites disagree on the time");
}

#[test]
fn clocks_invert_exactly() {
    let mut rng = Rng::new(4);
    for _ in 0..2_000 {
        let clock = SiteClock {
            offset_ms: rng.between(-100_000, 100_000),
            drift_ppm: rng.between(-DRIFT_PPM_MAX, DRIFT_PPM_MAX),
            epoch_ms: T0,
        };
        let local = T0 + rng.between(-1_000_000, 100_000_000);
        let at = clock.true_time_of(local);
        assert!(clock.local(at) >= local);
        assert!(clock.local(at - 1) < local, "{clock:?} {local}");
    }
}

#[test]
fn clocks_read_as_in_wide_arithmetic() {
    // The reference: the reading computed in i128 throughout.
    let reference = |clock: &SiteClock, true_ms: i64| {
        let elapsed = i128::from(true_ms - clock.epoch_ms);
        let drift = elapsed * i128::from(clock.drift_ppm) / 1_000_000;
        true_ms + clock.offset_ms + i64::try_from(drift).unwrap()
    };
    let mut rng = Rng::new(5);
    for _ in 0..2_000 {
        let clock = SiteClock {
            offset_ms: rng.between(-100_000, 100_000),
            drift_ppm: rng.between(-DRIFT_PPM_MAX, DRIFT_PPM_MAX),
            epoch_ms: T0,
        };
        // Around the epoch, and spans too long for the product to fit an
        // i64 (the i128 path).
        for true_ms in [
            T0 + rng.between(-1_000_000, 100_000_000),
            T0 - rng.between(0, 1_000),
            T0 + rng.between(1 << 50, 1 << 61),
            T0 - rng.between(1 << 50, 1 << 60),
        ] {
            assert_eq!(
                clock.local(true_ms),
                reference(&clock, true_ms),
                "{clock:?}"
            );
        }
    }
}

#[test]
fn a_capped_uplink_queues_messages() {
    let mut config = SimConfig::new(1, 2, T0);
    config.net.jitter_ms = 0;
    config.faults.uplink_bytes_per_s = Some(10_000);
    let mut sim = sim(config);
    let input = Input::Send {
        to: 1,
        count: 20,
        len: 1_000,
    };
    sim.schedule_input(T0, 0, "send", input);
    sim.run_until(T0 + 10_000);
    let times: Vec<i64> = sim.sites()[1].received.iter().map(|r| r.0).collect();
    assert_eq!(times.len(), 20);
    // 20 kB at 10 kB/s: the last leaves 2 s after the first.
    assert_eq!(times[19] - times[0], 1_900);
}

#[test]
fn the_rng_is_uniform_enough_and_streams_are_independent() {
    let mut rng = Rng::new(1);
    let mut buckets = [0u32; 10];
    for _ in 0..100_000 {
        buckets[rng.index(10)] += 1;
    }
    assert!(
        buckets.iter().all(|&b| (9_500..10_500).contains(&b)),
        "{buckets:?}"
    );
    let mut a = Rng::derive(1, 1);
    let mut b = Rng::derive(1, 2);
    assert_ne!(a.next_u64(), b.next_u64());
    let mean: i64 = (0..10_000).map(|_| rng.exponential_ms(1_000)).sum::<i64>() / 10_000;
    assert!((950..1_050).contains(&mean), "{mean}");
}
