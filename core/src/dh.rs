//! Diffie-Hellman parameters for auth key creation.

use std::sync::OnceLock;

use openssl::bn::{BigNum, BigNumContext};
use openssl::error::ErrorStack;
use rand::RngCore;
use rsa::BigUint;

/// Telegram's 2048-bit safe prime, which every client knows and accepts
/// without a full primality check.
const PRIME_HEX: &str = "c71caeb9c6b1c9048e6c522f70f13f73980d40238e3e21c14934d037563d930f\
48198a0aa7c14058229493d22530f4dbfa336f6e0ac925139543aed44cce7c37\
20fd51f69458705ac68cd4fe6b6b13abdc9746512969328454f18faf8c595f64\
2477fe96bb2a941d5bcd1d4ac8cc49880708fa9b378e3c4f3a9060bee67cf9a4\
a4a695811051907e162753b56b0f6b410dba74d8a84b2a14b3144e0ef1284754\
fd17ed950d5965b4b9dd46582db1178d169c6bc465b0d6ff9ca3928fef5b9ae4\
e418fc15e83ebea0f87fa9ff5eed70050ded2849f47bf959d956850ce929851f\
0d8115f635b105ee2e4e15d04b2454bf6f4fadf034b10403119cd8e3b92fcc5b";

/// g = 3 generates the subgroup of order (p-1)/2 because p mod 3 == 2.
pub const G: u32 = 3;

#[derive(Debug)]
pub struct DhParams {
    pub prime: BigUint,
    pub prime_bytes: Vec<u8>,
    pub g: BigUint,
    /// 2^(2048-64): the spec's safety margin for g_a and g_b.
    margin: BigUint,
}

pub fn params() -> &'static DhParams {
    static PARAMS: OnceLock<DhParams> = OnceLock::new();
    PARAMS.get_or_init(|| {
        let prime_bytes = hex::decode(PRIME_HEX).unwrap_or_default();
        DhParams {
            prime: BigUint::from_bytes_be(&prime_bytes),
            prime_bytes,
            g: BigUint::from(G),
            margin: BigUint::from(1u32) << (2048 - 64),
        }
    })
}

impl DhParams {
    /// The spec's checks for g_a and g_b: 1 < x < p − 1 and
    /// 2^(2048−64) ≤ x ≤ p − 2^(2048−64).
    pub fn in_safe_range(&self, x: &BigUint) -> bool {
        let one = BigUint::from(1u32);
        x > &one
            && x < &(&self.prime - &one)
            && x >= &self.margin
            && x <= &(&self.prime - &self.margin)
    }

    /// Draws a 2048-bit secret `a` whose `g^a mod p` is in the safe range.
    pub fn new_secret(&self, rng: &mut impl RngCore) -> Result<(BigUint, BigUint), ErrorStack> {
        loop {
            let mut bytes = [0u8; 256];
            rng.fill_bytes(&mut bytes);
            let a = BigUint::from_bytes_be(&bytes);
            let g_a = self.pow_secret(&self.g, &a)?;
            if self.in_safe_range(&g_a) {
                return Ok((a, g_a));
            }
        }
    }

    /// `base^secret mod p` with OpenSSL's constant-time Montgomery
    /// exponentiation: the secret exponent does not leak through timing, and
    /// it is about 3× faster than num-bigint's `modpow`. Two of these are most
    /// of a handshake's server time (`scripts/bench.sh`).
    pub fn pow_secret(&self, base: &BigUint, secret: &BigUint) -> Result<BigUint, ErrorStack> {
        let mut ctx = BigNumContext::new()?;
        let base = BigNum::from_slice(&base.to_bytes_be())?;
        let mut exponent = BigNum::from_slice(&secret.to_bytes_be())?;
        exponent.set_const_time();
        let prime = BigNum::from_slice(&self.prime_bytes)?;
        let mut power = BigNum::new()?;
        power.mod_exp(&base, &exponent, &prime, &mut ctx)?;
        Ok(BigUint::from_bytes_be(&power.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prime_is_2048_bits_and_g3_is_valid_for_it() {
        let p = params();
        assert_eq!(p.prime_bytes.len(), 256);
        assert_eq!(p.prime.bits(), 2048);
        assert_eq!(&p.prime % BigUint::from(3u32), BigUint::from(2u32));
        // A probable-prime check of p and (p-1)/2 with Fermat bases.
        let one = BigUint::from(1u32);
        let q = (&p.prime - &one) >> 1;
        for base in [2u32, 3, 5, 7] {
            let b = BigUint::from(base);
            assert_eq!(b.modpow(&(&p.prime - &one), &p.prime), one);
            assert_eq!(b.modpow(&(&q - &one), &q), one);
        }
    }

    #[test]
    fn safe_range_rejects_edges() {
        let p = params();
        let one = BigUint::from(1u32);
        assert!(!p.in_safe_range(&one));
        assert!(!p.in_safe_range(&(&p.prime - &one)));
        assert!(!p.in_safe_range(&BigUint::from(2u32)));
        assert!(!p.in_safe_range(&(&p.prime - (&one << 1000))));
        let (a, g_a) = p.new_secret(&mut rand::thread_rng()).unwrap();
        assert_eq!(
            g_a,
            p.g.modpow(&a, &p.prime),
            "OpenSSL and num-bigint agree"
        );
        assert!(p.in_safe_range(&g_a));
    }
}
