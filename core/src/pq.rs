//! The `pq` challenge of `resPQ`: products of two random 31-bit primes,
//! generated ahead of time so no handshake waits for prime search.

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PqPair {
    pub p: u32,
    pub q: u32,
}

impl PqPair {
    pub fn pq(&self) -> u64 {
        u64::from(self.p) * u64::from(self.q)
    }
}

/// A fixed set of pairs; each handshake picks one at random.
#[derive(Debug)]
pub struct PqPool {
    pairs: Vec<PqPair>,
}

impl PqPool {
    pub fn generate(size: usize, rng: &mut impl Rng) -> Self {
        let pairs = (0..size.max(1))
            .map(|_| loop {
                let a = random_prime(rng);
                let b = random_prime(rng);
                if a != b {
                    break PqPair {
                        p: a.min(b),
                        q: a.max(b),
                    };
                }
            })
            .collect();
        Self { pairs }
    }

    pub fn pick(&self, rng: &mut impl Rng) -> PqPair {
        self.pairs[rng.gen_range(0..self.pairs.len())]
    }
}

fn random_prime(rng: &mut impl Rng) -> u32 {
    loop {
        let candidate = rng.gen_range(1u32 << 30..1u32 << 31) | 1;
        if primal_check::miller_rabin(u64::from(candidate)) {
            return candidate;
        }
    }
}

/// Splits `pq` into its two prime factors (Pollard–Brent), as a client must;
/// used by the load generator and tests.
pub fn factorize(pq: u64) -> Option<(u64, u64)> {
    if pq < 4 {
        return None;
    }
    if pq.is_multiple_of(2) {
        return Some((2, pq / 2));
    }
    let mul = |a: u64, b: u64| (u128::from(a) * u128::from(b) % u128::from(pq)) as u64;
    for c in 1..64u64 {
        let f = |x: u64| (mul(x, x) + c) % pq;
        let (mut x, mut y, mut d) = (2u64, 2u64, 1u64);
        while d == 1 {
            x = f(x);
            y = f(f(y));
            d = gcd(x.abs_diff(y), pq);
        }
        if d != pq {
            let (a, b) = (d.min(pq / d), d.max(pq / d));
            return Some((a, b));
        }
    }
    None
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Reads a big-endian integer of up to 8 bytes (how clients send p and q).
pub fn be_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.len() > 8 {
        return None;
    }
    Some(bytes.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_distinct_31_bit_primes() {
        let pool = PqPool::generate(8, &mut rand::thread_rng());
        for pair in &pool.pairs {
            assert!(pair.p < pair.q);
            assert!(pair.p >= 1 << 30 && pair.q < 1 << 31);
            for n in [pair.p, pair.q] {
                let n = u64::from(n);
                assert!((2..=65_536u64)
                    .take_while(|d| d * d <= n)
                    .all(|d| n % d != 0));
            }
            assert_eq!(pair.pq() / u64::from(pair.p), u64::from(pair.q));
        }
    }

    #[test]
    fn factorize_recovers_pool_pairs() {
        let pool = PqPool::generate(4, &mut rand::thread_rng());
        for pair in &pool.pairs {
            assert_eq!(
                factorize(pair.pq()),
                Some((u64::from(pair.p), u64::from(pair.q)))
            );
        }
        // The constant teamgram sends, from its reference.
        assert_eq!(
            factorize(1_724_114_033_281_923_457),
            Some((1_229_739_323, 1_402_015_859))
        );
    }

    #[test]
    fn be_u64_reads_minimal_and_padded_encodings() {
        assert_eq!(be_u64(&[0x49, 0x4c, 0x55, 0x3b]), Some(1_229_739_323));
        assert_eq!(be_u64(&[0, 0, 0x49, 0x4c, 0x55, 0x3b]), Some(1_229_739_323));
        assert_eq!(be_u64(&[1; 9]), None);
    }
}
