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
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}
