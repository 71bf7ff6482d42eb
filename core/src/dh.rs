//! Diffie-Hellman parameters for auth key creation.

use std::sync::OnceLock;

use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{CtAssign, CtEq, Odd, Word, U2048};
use openssl::bn::{BigNum, BigNumContext};
use openssl::error::ErrorStack;
use rand::RngCore;
use rsa::BigUint;
use zeroize::{Zeroize, Zeroizing};

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

/// The secret length the spec asks for: as long as the prime.
pub const SPEC_SECRET_BITS: u32 = 2048;

/// The shortest secret accepted: NIST SP 800-56A rev. 3 (§5.6.1.1.1) and
/// RFC 7919 (§5.2) ask for at least twice the group's security strength,
/// which is 112 bits for a 2048-bit safe-prime group.
pub const MIN_SECRET_BITS: u32 = 224;

/// A DH secret exponent (big-endian), wiped from memory when dropped.
pub struct DhSecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for DhSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DhSecret({} bits)", self.0.len() * 8)
    }
}

pub struct DhParams {
    pub prime: BigUint,
    pub prime_bytes: Vec<u8>,
    pub g: BigUint,
    /// 2^(2048-64): the spec's safety margin for g_a and g_b.
    margin: BigUint,
    powers_of_g: PowersOfG,
}

impl std::fmt::Debug for DhParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhParams")
            .field("prime", &self.prime)
            .field("g", &self.g)
            .finish_non_exhaustive()
    }
}

/// The group, built on first use (about 20 ms, mostly the table of powers
/// of g); a server calls this at start so no handshake waits for it.
pub fn params() -> &'static DhParams {
    static PARAMS: OnceLock<DhParams> = OnceLock::new();
    PARAMS.get_or_init(|| {
        let prime = U2048::from_be_hex(PRIME_HEX);
        let prime_bytes = prime.to_be_bytes().to_vec();
        DhParams {
            prime: BigUint::from_bytes_be(&prime_bytes),
            prime_bytes,
            g: BigUint::from(G),
            margin: BigUint::from(1u32) << (2048 - 64),
            powers_of_g: PowersOfG::new(prime),
        }
    })
}

/// Bits of the secret per table row.
const WINDOW_BITS: usize = 4;
const ROW_LEN: usize = 1 << WINDOW_BITS;

/// `g^secret` for the fixed g by table lookup: row `i` holds
/// `g^(j · 16^i)` for `j` in 0..16 (Montgomery form), so `g^secret` is one
/// multiplication per 4 bits of the secret, 512 for a spec-length one,
/// where a generic exponentiation squares once per bit and multiplies per
/// window besides. The row entry is picked by reading all 16 with
/// constant-time selects, and crypto-bigint's Montgomery multiplication is
/// constant-time, so nothing about the secret shows in timing or memory
/// access. It takes about half of OpenSSL's time for the same power (1.2
/// against 2.2 ms on the 2-core dev VM); the table is 2 MiB.
struct PowersOfG {
    params: FixedMontyParams<{ U2048::LIMBS }>,
    rows: Vec<[U2048; ROW_LEN]>,
}

impl PowersOfG {
    fn new(prime: U2048) -> Self {
        let params =
            FixedMontyParams::new_vartime(Odd::new(prime).expect("Telegram's DH prime is odd"));
        let mut base = FixedMontyForm::new(&U2048::from_u64(G.into()), &params);
        let rows = (0..SPEC_SECRET_BITS as usize / WINDOW_BITS)
            .map(|_| {
                let mut row = [U2048::ZERO; ROW_LEN];
                let mut power = FixedMontyForm::one(&params);
                for entry in &mut row {
                    *entry = *power.as_montgomery();
                    power *= base;
                }
                base = power;
                row
            })
            .collect();
        Self { params, rows }
    }

    /// `g^secret mod p` for a big-endian secret of at most 256 bytes (a
    /// [`DhSecret`]); the work depends only on the secret's length.
    fn pow(&self, secret: &[u8]) -> U2048 {
        let mut padded = Zeroizing::new([0u8; 256]);
        padded[256 - secret.len()..].copy_from_slice(secret);
        let mut exponent = U2048::from_be_slice(&padded[..]);
        let mut power = FixedMontyForm::one(&self.params);
        let mut entry = U2048::ZERO;
        let windows = (secret.len() * 8).div_ceil(WINDOW_BITS);
        for (i, row) in self.rows.iter().take(windows).enumerate() {
            let bit = i * WINDOW_BITS;
            let digit = (exponent.as_words()[bit / Word::BITS as usize]
                >> (bit % Word::BITS as usize))
                & (ROW_LEN as Word - 1);
            entry = row[0];
            for (j, candidate) in row.iter().enumerate().skip(1) {
                entry.ct_assign(candidate, (j as Word).ct_eq(&digit));
            }
            power *= FixedMontyForm::from_montgomery(entry, &self.params);
        }
        exponent.zeroize();
        entry.zeroize();
        power.retrieve()
    }
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

    /// Draws a secret `a` of `bits` bits (at most 2048; see [`MIN_SECRET_BITS`])
    /// whose `g^a mod p` is in the safe range. A shorter secret makes `g^a`
    /// and the shared key's exponentiation cheaper in proportion.
    pub fn new_secret(&self, bits: u32, rng: &mut impl RngCore) -> (DhSecret, BigUint) {
        let bits = bits.clamp(1, SPEC_SECRET_BITS);
        let len = bits.div_ceil(8) as usize;
        loop {
            let mut bytes = Zeroizing::new(vec![0u8; len]);
            rng.fill_bytes(&mut bytes);
            bytes[0] &= 0xff >> (len as u32 * 8 - bits);
            let a = DhSecret(bytes);
            let g_a = BigUint::from_bytes_be(&self.powers_of_g.pow(&a.0).to_be_bytes());
            if self.in_safe_range(&g_a) {
                return (a, g_a);
            }
        }
    }

    /// The auth key `g_b^a mod p` as the 256 bytes MTProto uses (leading
    /// zeros kept), wiped when dropped.
    pub fn shared_key(
        &self,
        g_b: &BigUint,
        secret: &DhSecret,
    ) -> Result<Zeroizing<[u8; 256]>, ErrorStack> {
        let mut power = self.exp(g_b, secret)?;
        let bytes = Zeroizing::new(power.to_vec());
        power.clear();
        let mut key = Zeroizing::new([0u8; 256]);
        let len = bytes.len().min(256);
        key[256 - len..].copy_from_slice(&bytes[bytes.len() - len..]);
        Ok(key)
    }

    /// OpenSSL's constant-time Montgomery exponentiation: the secret
    /// exponent does not leak through timing, and it is about 3× faster than
    /// num-bigint's `modpow`. For a base that varies (the peer's `g_b`); this
    /// is the largest part of a handshake's server time (`scripts/perf.sh`),
    /// and `g^a` takes the table instead. OpenSSL's copy of the secret is cleared
    /// before it is freed (its context clears its temporaries itself).
    fn exp(&self, base: &BigUint, secret: &DhSecret) -> Result<BigNum, ErrorStack> {
        let mut ctx = BigNumContext::new()?;
        let base = BigNum::from_slice(&base.to_bytes_be())?;
        let prime = BigNum::from_slice(&self.prime_bytes)?;
        let mut exponent = BigNum::from_slice(&secret.0)?;
        exponent.set_const_time();
        let mut power = BigNum::new()?;
        let done = power.mod_exp(&base, &exponent, &prime, &mut ctx);
        exponent.clear();
        done.map(|()| power)
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
    fn the_table_of_powers_agrees_with_plain_exponentiation() {
        let p = params();
        let mut rng = rand::thread_rng();
        let mut secrets = vec![
            vec![0u8],
            vec![1],
            vec![0x0f],
            vec![0xff; 256],
            vec![0; 256],
        ];
        for len in [1, 2, 28, 32, 127, 256] {
            let mut secret = vec![0u8; len];
            rng.fill_bytes(&mut secret);
            secrets.push(secret);
        }
        for secret in secrets {
            let expected = p.g.modpow(&BigUint::from_bytes_be(&secret), &p.prime);
            let got = BigUint::from_bytes_be(&p.powers_of_g.pow(&secret).to_be_bytes());
            assert_eq!(got, expected, "{}", hex::encode(&secret));
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
        let (a, g_a) = p.new_secret(SPEC_SECRET_BITS, &mut rand::thread_rng());
        assert_eq!(
            g_a,
            p.g.modpow(&BigUint::from_bytes_be(&a.0), &p.prime),
            "OpenSSL and num-bigint agree"
        );
        assert!(p.in_safe_range(&g_a));
    }

    #[test]
    fn secrets_have_the_asked_length_and_agree_on_the_key() {
        let p = params();
        let mut rng = rand::thread_rng();
        for bits in [MIN_SECRET_BITS, 256, 1001, SPEC_SECRET_BITS] {
            let (a, g_a) = p.new_secret(bits, &mut rng);
            let a_bits = BigUint::from_bytes_be(&a.0).bits();
            assert!(
                a_bits <= bits as usize && a_bits > bits as usize - 32,
                "{bits}: {a_bits}"
            );
            assert_eq!(
                format!("{a:?}"),
                format!("DhSecret({} bits)", bits.div_ceil(8) * 8)
            );
            let (b, g_b) = p.new_secret(SPEC_SECRET_BITS, &mut rng);
            let key = p.shared_key(&g_b, &a).unwrap();
            assert_eq!(key, p.shared_key(&g_a, &b).unwrap());
            let expected = g_b.modpow(&BigUint::from_bytes_be(&a.0), &p.prime);
            assert_eq!(BigUint::from_bytes_be(&key[..]), expected);
        }
    }
}
