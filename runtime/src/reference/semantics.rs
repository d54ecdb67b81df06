//! The MoA visibility rules (docs/semantics.md section 3) and the cache slot rule
//! (section 5), stated once, literally, for the reference backend and the tests.

/// Decode: with `t` tokens held, does the newest token see position `p`?
/// `{0 .. min(sink, t)-1} ∪ {max(sink, t - local) .. t-1}`.
pub fn decode_sees(t: usize, sink: usize, local: usize, p: usize) -> bool {
    if p >= t {
        return false;
    }
    p < sink.min(t) || p >= sink.max(t.saturating_sub(local))
}

/// Prefill mode `moa-block64`: does query `q` see key `k`?
/// `k <= q` and (`k/64 < sink/64` or `k/64 >= q/64 - local/64 + 1`).
#[allow(clippy::int_plus_one)] // written exactly as the semantics page states it
pub fn block64_sees(q: usize, k: usize, sink: usize, local: usize) -> bool {
    if k > q {
        return false;
    }
    let (kb, qb) = (k / 64, q / 64);
    let (gb, nb) = (sink / 64, local / 64);
    kb < gb || kb as i64 >= qb as i64 - nb as i64 + 1
}

/// Prefill mode `token`: the decode rule with `t = q + 1`.
pub fn token_sees(q: usize, k: usize, sink: usize, local: usize) -> bool {
    decode_sees(q + 1, sink, local, k)
}

/// The slot of position `p` in a KV head's region of `capacity` slots.
pub fn slot_of(p: usize, sink: usize, capacity: usize) -> usize {
    if p < sink {
        p
    } else {
        sink + (p - sink) % (capacity - sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rule_by_hand() {
        // sink 64, local 64 (C = 128), t = 200: sees 0..63 and 136..199.
        let seen: Vec<usize> = (0..200).filter(|&p| decode_sees(200, 64, 64, p)).collect();
        let want: Vec<usize> = (0..64).chain(136..200).collect();
        assert_eq!(seen, want);
        // t < sink: everything.
        assert_eq!((0..10).filter(|&p| decode_sees(10, 64, 64, p)).count(), 10);
        // t == C: everything.
        assert_eq!(
            (0..128).filter(|&p| decode_sees(128, 64, 64, p)).count(),
            128
        );
        assert_eq!(
            (0..129).filter(|&p| decode_sees(129, 64, 64, p)).count(),
            128
        );
    }

    #[test]
    fn block64_rule_by_hand() {
        // local 128 -> nb = 2: query 300 (block 4) sees blocks 0 and 3..4.
        let seen: Vec<usize> = (0..=300)
            .filter(|&k| block64_sees(300, k, 64, 128))
            .collect();
        let want: Vec<usize> = (0..64).chain(192..=300).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn ring_slots() {
        assert_eq!(slot_of(5, 64, 128), 5);
        assert_eq!(slot_of(64, 64, 128), 64);
        assert_eq!(slot_of(127, 64, 128), 127);
        assert_eq!(slot_of(128, 64, 128), 64);
        assert_eq!(slot_of(200, 64, 192), 72);
    }
}
