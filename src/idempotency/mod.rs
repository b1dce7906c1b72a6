//! The idempotency gate's pure parts: the key, the fingerprint, the record
//! and the decision table. Nothing in here does I/O.

pub mod decision;
pub mod fingerprint;
pub mod key;
pub mod record;

/// Lower-case hex of a byte string (sha2 0.11 digests have no `LowerHex`).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Bytes, not `String::push` (which UTF-8-encodes each char): a third
    // of the instructions.
    let digits = bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .collect();
    String::from_utf8(digits).expect("hex digits are ASCII")
}
