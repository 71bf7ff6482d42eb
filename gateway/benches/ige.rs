//! AES-256-IGE throughput (decrypt + msg_key check, and a reply's
//! encryption) against OpenSSL AES-256-CBC encrypt, measured interleaved.
//!
//! Measured one after the other (as criterion does), the ratio of one build
//! moved between 0.49 and 0.67 from run to run on a VM whose speed drifts
//! within seconds. Here short slices of the three take turns, in rotating
//! order, so each round's ratio compares the same seconds of the machine;
//! the figures are medians over rounds. `scripts/bench.sh` and
//! `scripts/perf.sh` run it; `--rounds N` sets the rounds per size.
//!
//! Our decryption works in place, so each of its iterations first copies
//! the frame back into its buffer; that copy (a few percent at 16 KiB) is
//! counted against us.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use openssl::symm::{Cipher, Crypter, Mode};

use mtproto_core::authkey::AuthKey;
use mtproto_core::message::{decrypt, encrypt, encrypt_as_client, plaintext_message};

const SIZES: [usize; 2] = [16 * 1024, 1024];
const DEFAULT_ROUNDS: usize = 101;
/// How long one slice of the OpenSSL reference runs; ours run the same
/// number of iterations.
const SLICE: Duration = Duration::from_millis(2);
const WARM_UP: Duration = Duration::from_millis(300);

/// One of the measured operations on a message of the bench's size.
type Op<'a> = Box<dyn FnMut() + 'a>;

fn main() {
    let rounds = rounds_from_args();
    for size in SIZES {
        let key = AuthKey::new(std::array::from_fn(|i| (i * 13) as u8));
        let body = vec![7u8; size - 32 - 16];
        let frame = encrypt_as_client(
            &key,
            &plaintext_message(1, 2, 4, 1, &body),
            16,
            &mut rand::thread_rng(),
        );
        let reply = plaintext_message(1, 2, 5, 1, &body);
        let mut work = frame.clone();
        decrypt(&key, &mut work, false).expect("the bench's frame decrypts");
        let mut out = BytesMut::with_capacity(size + 64);
        let (openssl_key, iv) = ([3u8; 32], [5u8; 16]);
        let input = vec![9u8; size];
        let mut output = vec![0u8; size + 32];
        let mut ops: [Op<'_>; 3] = [
            Box::new(|| {
                work.copy_from_slice(&frame);
                black_box(decrypt(&key, &mut work, false).map(|d| d.msg_id)).ok();
            }),
            Box::new(|| {
                out.clear();
                encrypt(&key, &reply, &mut out, &mut rand::thread_rng());
                black_box(out.len());
            }),
            Box::new(|| {
                let mut crypter = Crypter::new(
                    Cipher::aes_256_cbc(),
                    Mode::Encrypt,
                    &openssl_key,
                    Some(&iv),
                )
                .expect("openssl cipher");
                crypter.pad(false);
                black_box(crypter.update(&input, &mut output).expect("openssl update"));
            }),
        ];
        let report = measure(&mut ops, rounds);
        let mb_s = |secs: f64| size as f64 / secs / 1e6;
        println!(
            "ige {size} B: decrypt+verify {:.1} MB/s, encrypt {:.1} MB/s, \
             OpenSSL AES-256-CBC encrypt {:.1} MB/s; decrypt+verify/OpenSSL {:.2} \
             ({:.2}-{:.2} over {rounds} rounds)",
            mb_s(report.median_secs[0]),
            mb_s(report.median_secs[1]),
            mb_s(report.median_secs[2]),
            report.ratio.median,
            report.ratio.min,
            report.ratio.max,
        );
    }
}

fn rounds_from_args() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--rounds takes a positive number"))
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_ROUNDS)
}

struct Report {
    /// Median seconds per iteration of each op.
    median_secs: [f64; 3],
    /// Decrypt+verify's throughput over OpenSSL's, per round.
    ratio: Spread,
}

struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

/// Runs `rounds` rounds; in each, every op runs one slice, starting with
/// a different op each round.
fn measure(ops: &mut [Op<'_>; 3], rounds: usize) -> Report {
    let iterations = calibrate(ops);
    let mut secs: [Vec<f64>; 3] = Default::default();
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut this = [0f64; 3];
        for turn in 0..ops.len() {
            let i = (round + turn) % ops.len();
            let op = &mut ops[i];
            let start = Instant::now();
            for _ in 0..iterations {
                op();
            }
            this[i] = start.elapsed().as_secs_f64() / iterations as f64;
        }
        for (all, s) in secs.iter_mut().zip(this) {
            all.push(s);
        }
        ratios.push(this[2] / this[0]);
    }
    Report {
        median_secs: secs.map(|mut s| median(&mut s)),
        ratio: Spread {
            min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            max: ratios.iter().copied().fold(0.0, f64::max),
            median: median(&mut ratios),
        },
    }
}

/// Warms all three up and returns the iterations that fill one slice of
/// the reference.
fn calibrate(ops: &mut [Op<'_>; 3]) -> u32 {
    let until = Instant::now() + WARM_UP;
    let mut reference = Duration::ZERO;
    let mut runs = 0u32;
    while Instant::now() < until {
        for (i, op) in ops.iter_mut().enumerate() {
            let start = Instant::now();
            op();
            if i == 2 {
                reference += start.elapsed();
                runs += 1;
            }
        }
    }
    let per_run = reference / runs.max(1);
    (SLICE.as_nanos() / per_run.as_nanos().max(1)).clamp(1, u32::MAX.into()) as u32
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
