//! The idempotency gate's pure parts: the key, the fingerprint, the record
//! and the decision table. Nothing in here does I/O.

pub mod decision;
pub mod fingerprint;
pub mod key;
pub mod record;

/// Lower-case hex of a byte string (sha2 0.11 digests have no `LowerHex`).
pub fn hex(bytes: &[u8]) -> String {
    let mut digits = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut digits);
    String::from_utf8(digits).expect("hex digits are ASCII")
}

/// Writes `bytes` as lowercase hex into `out`, two digits a byte, as far as
/// `out` reaches.
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Each byte's two hex digits, looked up at once (request and trace ids,
/// fingerprints: three or more per request).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
        b += 1;
    }
    table
};
