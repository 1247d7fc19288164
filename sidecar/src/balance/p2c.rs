//! Power of two choices: pick two endpoints at random, send to the cheaper.

/// Picks among `n` endpoints: `None` when there are none, the only one when there is one,
/// else the cheaper of two distinct random candidates (ties go to the first drawn).
/// `random(bound)` must return a number in `0..bound`; it is called with `n`, then with
/// `n - 1` for the second candidate (drawn among the others, so no retry loop is needed).
/// Out-of-range draws are folded into range rather than trusted. Costs are compared with
/// `<`, so a NaN cost never wins.
pub fn pick(
    n: usize,
    cost: impl Fn(usize) -> f64,
    mut random: impl FnMut(usize) -> usize,
) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = random(n) % n;
            let b = random(n - 1) % (n - 1);
            let b = if b >= a { b + 1 } else { b };
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A fixed pseudo-random sequence (xorshift64), so every run sees the same draws.
    fn sequence(seed: u64) -> impl FnMut(usize) -> usize {
        let mut s = seed;
        move |bound| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % bound as u64) as usize
        }
    }

    fn counts(costs: &[f64], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; costs.len()];
        let mut random = sequence(0x9e37_79b9_7f4a_7c15);
        for _ in 0..picks {
            let i = pick(costs.len(), |i| costs[i], &mut random).unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn none_for_no_endpoint_and_the_only_one_for_one() {
        assert_eq!(pick(0, |_| unreachable!(), |_| unreachable!()), None);
        assert_eq!(pick(1, |_| unreachable!(), |_| unreachable!()), Some(0));
    }

    #[test]
    fn candidates_are_distinct_and_every_pair_is_reachable() {
        let n = 4;
        let mut pairs = Vec::new();
        for first in 0..n {
            for second in 0..n - 1 {
                let seen = RefCell::new(Vec::new());
                let mut draws = [first, second].into_iter();
                let cost = |i| {
                    seen.borrow_mut().push(i);
                    1.0
                };
                let chosen = pick(n, cost, |_| draws.next().unwrap()).unwrap();
                let seen = seen.into_inner();
                assert_eq!(seen.len(), 2);
                assert_ne!(seen[0], seen[1]);
                assert!(seen.iter().all(|&i| i < n));
                assert_eq!(chosen, first, "a tie goes to the first candidate");
                pairs.push((seen[0].min(seen[1]), seen[0].max(seen[1])));
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
        assert_eq!(pairs.len(), n * (n - 1) / 2);
    }

    #[test]
    fn out_of_range_draws_do_not_panic() {
        assert_eq!(pick(3, |i| i as f64, |_| usize::MAX), Some(0));
    }

    #[test]
    fn the_cheaper_candidate_wins() {
        let costs = [5.0, 1.0];
        assert_eq!(pick(2, |i| costs[i], |_| 0), Some(1));
        let mut draws = [1, 0].into_iter();
        assert_eq!(pick(2, |i| costs[i], |_| draws.next().unwrap()), Some(1));
    }

    #[test]
    fn the_slow_endpoint_is_chosen_rarely() {
        // The slowest of several is never chosen: it always loses to its partner.
        let c = counts(&[10.0, 10.0, 10.0, 500.0], 30_000);
        assert_eq!(c[3], 0);
        for &fast in &c[..3] {
            assert!((9_000..11_000).contains(&fast), "{c:?}");
        }
        // The second slowest wins only when drawn with the slowest: 2 of 12 ordered pairs.
        let c = counts(&[10.0, 10.0, 200.0, 500.0], 30_000);
        assert_eq!(c[3], 0);
        assert!((4_500..5_500).contains(&c[2]), "{c:?}");
    }
}
